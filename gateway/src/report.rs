//! What the gateway is doing, as one snapshot ([`StatusReport`]).
//!
//! A running gateway builds it from its [`Stats`], the outbox depth and the disk
//! ([`Live::report`]); `/status` serves it as JSON, `/metrics` renders it in the
//! Prometheus format ([`crate::metrics`]), and the systemd status line summarises it. When
//! the gateway is not running, `pigeon-gateway status` builds one from the outbox
//! database alone ([`StatusReport::from_outbox`]). [`render_text`] turns either into the
//! summary for the person at the Pi.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::host;
use crate::outbox::{DepthCache, OutboxReader, db};
use crate::stats::Stats;

/// Whether the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RunState {
    Running,
    Stopped,
    /// Its HTTP endpoint is disabled, or did not answer in time.
    Unknown,
}

/// One snapshot of the gateway, running or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatusReport {
    pub(crate) gateway: String,
    pub(crate) state: RunState,
    /// Why the state is `unknown` (or how `stopped` was decided).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) state_detail: Option<String>,
    /// When the snapshot was taken (Unix seconds); ages are relative to it.
    pub(crate) at_unix: i64,
    pub(crate) relay_url: String,
    /// `host:port` of the MQTT broker, when an MQTT source is configured.
    pub(crate) mqtt_broker: Option<String>,
    /// What waits in the outbox; `None` when it could not be read (`outbox_error`).
    pub(crate) outbox: Option<OutboxStatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) outbox_error: Option<String>,
    /// The filesystem holding the data directory.
    pub(crate) disk: Option<DiskStatus>,
    /// What only a running gateway knows (counters since its start).
    pub(crate) live: Option<LiveStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OutboxStatus {
    pub(crate) path: String,
    /// Events waiting to be uploaded.
    pub(crate) waiting: u64,
    pub(crate) waiting_bytes: u64,
    /// Receive time of the oldest waiting event (µs since the epoch).
    pub(crate) oldest_time_us: Option<i64>,
    pub(crate) oldest_age_seconds: Option<f64>,
    /// Events the relay rejected, kept in the dead-letter table.
    pub(crate) dead_letters: u64,
    /// Of `waiting`, files (their bytes wait in the spool; included in `waiting_bytes`).
    #[serde(default)]
    pub(crate) waiting_files: u64,
    #[serde(default)]
    pub(crate) waiting_file_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiskStatus {
    pub(crate) free_bytes: u64,
    pub(crate) total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LiveStatus {
    pub(crate) pid: u32,
    pub(crate) version: String,
    pub(crate) started_unix: i64,
    pub(crate) uptime_seconds: u64,
    /// Taking data: the outbox commits and every configured source is connected.
    pub(crate) ready: bool,
    pub(crate) not_ready_reason: Option<String>,
    /// `None` when no MQTT source is configured.
    pub(crate) mqtt_connected: Option<bool>,
    pub(crate) mqtt_received: u64,
    /// MQTT messages dropped for being larger than `mqtt.max_packet_size`, or with an
    /// event larger than `relay.max_event_bytes`.
    #[serde(default)]
    pub(crate) mqtt_oversized: u64,
    /// Whether the last upload attempt reached the relay; `None` before the first.
    pub(crate) relay_reachable: Option<bool>,
    pub(crate) last_upload_unix: Option<i64>,
    pub(crate) upload_requests: u64,
    pub(crate) upload_successes: u64,
    pub(crate) upload_failures: u64,
    pub(crate) upload_retries: u64,
    pub(crate) upload_bytes: u64,
    pub(crate) events_delivered: u64,
    pub(crate) events_duplicate: u64,
    pub(crate) events_dead_lettered: u64,
    pub(crate) outbox_commits: u64,
    pub(crate) outbox_commit_failures: u64,
    /// Records dropped unsent because their route's TTL ran out.
    #[serde(default)]
    pub(crate) outbox_expired: u64,
    /// Records and files a full outbox dropped to make room (`when_full =
    /// "drop_oldest"`), and their bytes; new ones it refused (`when_full = "refuse"`).
    #[serde(default)]
    pub(crate) outbox_dropped: u64,
    #[serde(default)]
    pub(crate) outbox_dropped_bytes: u64,
    #[serde(default)]
    pub(crate) outbox_refused: u64,
    /// What the outbox and the spool use, as the budget counts it, and the budget
    /// (`outbox.max_bytes`; `None`: only `outbox.min_free`).
    #[serde(default)]
    pub(crate) outbox_used_bytes: u64,
    #[serde(default)]
    pub(crate) outbox_max_bytes: Option<u64>,
    pub(crate) heartbeats: u64,
    /// Records committed per source since the start.
    pub(crate) sources: Vec<SourceCount>,
    /// Records committed per MQTT subscription since the start.
    pub(crate) subscriptions: Vec<SubscriptionCount>,
    /// MQTT records on topics no configured filter matches.
    pub(crate) mqtt_unmatched: u64,
    /// `None` when no drop directories are watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) files: Option<FilesStatus>,
    /// The edge rules, in configuration order (empty: none configured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) rules: Vec<RuleStatus>,
    /// Readings the rules kept from the relay (acknowledged, not stored).
    #[serde(default)]
    pub(crate) rules_suppressed: u64,
    pub(crate) last_error: Option<ErrorStatus>,
}

/// One edge rule since the start (docs/rules.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RuleStatus {
    pub(crate) name: String,
    /// Readings its filter was evaluated on, and those that passed it.
    pub(crate) evaluated: u64,
    pub(crate) matched: u64,
    /// Events it derived.
    pub(crate) emitted: u64,
    /// Matching readings without a usable value or time.
    pub(crate) unreadable: u64,
    /// Readings too late for their window.
    pub(crate) late: u64,
    /// Groups dropped because the rule had `max_groups` of them.
    pub(crate) evicted: u64,
    /// Groups it keeps a state for now, and of those, alarms raised or sensors silent.
    pub(crate) groups: u64,
    pub(crate) active: u64,
    /// Time spent evaluating it (sampled).
    pub(crate) evaluation_seconds: f64,
}

/// Camera files since the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FilesStatus {
    /// Files taken into the spool, and their bytes.
    pub(crate) picked_up: u64,
    pub(crate) picked_up_bytes: u64,
    /// Finished files whose pickup failed (each counted once, logged with the reason).
    pub(crate) pickup_errors: u64,
    /// Of those, the files still failing (retried).
    #[serde(default)]
    pub(crate) failing: u64,
    /// Files being written in the drop directories now (or settling).
    pub(crate) being_written: u64,
    /// Files the relay stored.
    pub(crate) delivered: u64,
    /// File bytes sent (resumed uploads count only what was sent again).
    pub(crate) bytes_sent: u64,
    /// Uploads continued from what the relay already had.
    pub(crate) resumed: u64,
    /// Uploads in progress now.
    pub(crate) uploading: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SourceCount {
    pub(crate) name: String,
    pub(crate) records: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubscriptionCount {
    pub(crate) filter: String,
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) records: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorStatus {
    pub(crate) unix: i64,
    pub(crate) level: String,
    pub(crate) message: String,
}

/// The parts of a running gateway a report is built from.
pub(crate) struct Live {
    pub(crate) gateway: String,
    pub(crate) relay_url: String,
    pub(crate) mqtt_broker: Option<String>,
    pub(crate) data_dir: PathBuf,
    pub(crate) stats: Arc<Stats>,
    pub(crate) depth: Arc<DepthCache>,
    pub(crate) started: Instant,
    pub(crate) started_unix: i64,
    /// Set when the gateway begins to stop.
    pub(crate) stopping: AtomicBool,
    /// Whether drop directories are watched.
    pub(crate) files: bool,
    /// `outbox.max_bytes`.
    pub(crate) outbox_max_bytes: Option<u64>,
}

impl Live {
    pub(crate) fn new(config: &Config, stats: Arc<Stats>, depth: Arc<DepthCache>) -> Self {
        Self {
            gateway: config.gateway.id.to_string(),
            relay_url: config.relay.url.clone(),
            mqtt_broker: config
                .mqtt
                .as_ref()
                .map(|m| format!("{}:{}", m.host, m.port)),
            data_dir: config.gateway.data_dir.clone(),
            stats,
            depth,
            started: Instant::now(),
            started_unix: chrono::Utc::now().timestamp(),
            stopping: AtomicBool::new(false),
            files: config.files.is_some(),
            outbox_max_bytes: config.outbox.max_bytes.map(|b| b.get()),
        }
    }

    /// `Ok` while the gateway takes data: not stopping, the last outbox commit succeeded,
    /// and the MQTT source (if any) is connected. The relay being unreachable does not
    /// count: buffering in the outbox is the gateway doing its job.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        if self.stopping.load(Relaxed) {
            return Err("the gateway is stopping".into());
        }
        if self.stats.outbox_failing.load(Relaxed) {
            return Err("the last outbox commit failed".into());
        }
        if self.mqtt_broker.is_some() && !self.stats.mqtt_connected.load(Relaxed) {
            return Err("not connected to the MQTT broker".into());
        }
        Ok(())
    }

    /// A snapshot now. Reads the outbox (cached, off the reactor) and the disk.
    pub(crate) async fn report(&self) -> StatusReport {
        let now_us = chrono::Utc::now().timestamp_micros();
        let (outbox, outbox_error) = self.outbox_status(now_us).await;
        StatusReport {
            gateway: self.gateway.clone(),
            state: RunState::Running,
            state_detail: None,
            at_unix: now_us.div_euclid(1_000_000),
            relay_url: self.relay_url.clone(),
            mqtt_broker: self.mqtt_broker.clone(),
            outbox,
            outbox_error,
            disk: self.disk_status().await,
            live: Some(self.live_status()),
        }
    }

    /// What waits in the outbox, or why it cannot be read.
    async fn outbox_status(&self, now_us: i64) -> (Option<OutboxStatus>, Option<String>) {
        match self.depth.get().await {
            Ok(d) => (
                Some(OutboxStatus {
                    path: db::path_in(&self.data_dir).display().to_string(),
                    waiting: d.pending.count,
                    waiting_bytes: d.pending.bytes,
                    oldest_time_us: d.pending.oldest_time_us,
                    oldest_age_seconds: crate::sources::health::oldest_age_seconds(&d, now_us),
                    dead_letters: d.dead_letters,
                    waiting_files: d.pending.files,
                    waiting_file_bytes: d.pending.file_bytes,
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        }
    }

    /// Space on the data directory's filesystem (statvfs, off the reactor).
    async fn disk_status(&self) -> Option<DiskStatus> {
        let dir = self.data_dir.clone();
        tokio::task::spawn_blocking(move || host::disk_space(&dir))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|d| DiskStatus {
                free_bytes: d.free_bytes,
                total_bytes: d.total_bytes,
            })
    }

    /// The running process's counters and connections.
    fn live_status(&self) -> LiveStatus {
        let s = &self.stats;
        let readiness = self.readiness();
        let last_upload = s.last_upload_unix.load(Relaxed);
        LiveStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_unix: self.started_unix,
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: readiness.is_ok(),
            not_ready_reason: readiness.err(),
            mqtt_connected: self
                .mqtt_broker
                .as_ref()
                .map(|_| s.mqtt_connected.load(Relaxed)),
            mqtt_received: s.mqtt_received.load(Relaxed),
            mqtt_oversized: s.mqtt_oversized.load(Relaxed),
            relay_reachable: (s.relay_last_attempt_unix.load(Relaxed) > 0)
                .then(|| s.relay_reachable.load(Relaxed)),
            last_upload_unix: (last_upload > 0).then_some(last_upload as i64),
            upload_requests: s.upload_requests.load(Relaxed),
            upload_successes: s.upload_successes.load(Relaxed),
            upload_failures: s.upload_failures.load(Relaxed),
            upload_retries: s.upload_retries.load(Relaxed),
            upload_bytes: s.bytes_sent.load(Relaxed),
            events_delivered: s.events_delivered.load(Relaxed),
            events_duplicate: s.events_duplicate.load(Relaxed),
            events_dead_lettered: s.events_dead_lettered.load(Relaxed),
            outbox_commits: s.outbox_commits.load(Relaxed),
            outbox_commit_failures: s.outbox_commit_failures.load(Relaxed),
            outbox_expired: s.outbox_expired.load(Relaxed),
            outbox_dropped: s.outbox_dropped.load(Relaxed),
            outbox_dropped_bytes: s.outbox_dropped_bytes.load(Relaxed),
            outbox_refused: s.outbox_refused.load(Relaxed),
            outbox_used_bytes: s.outbox_used_bytes.load(Relaxed),
            outbox_max_bytes: self.outbox_max_bytes,
            heartbeats: s.heartbeats.load(Relaxed),
            sources: s
                .sources
                .iter()
                .map(|c| SourceCount {
                    name: c.name.clone(),
                    records: c.records.load(Relaxed),
                })
                .collect(),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|c| SubscriptionCount {
                    filter: c.filter.clone(),
                    event_type: c.event_type.clone(),
                    records: c.records.load(Relaxed),
                })
                .collect(),
            mqtt_unmatched: s.mqtt_unmatched.load(Relaxed),
            files: self.files.then(|| FilesStatus {
                picked_up: s.files_picked_up.load(Relaxed),
                picked_up_bytes: s.file_bytes_picked_up.load(Relaxed),
                pickup_errors: s.file_pickup_errors.load(Relaxed),
                failing: s.file_pickups_failing.load(Relaxed),
                being_written: s.files_being_written.load(Relaxed),
                delivered: s.files_delivered.load(Relaxed),
                bytes_sent: s.file_bytes_sent.load(Relaxed),
                resumed: s.file_upload_resumes.load(Relaxed),
                uploading: s.file_uploads_active.load(Relaxed),
            }),
            rules: s
                .rules
                .get()
                .into_iter()
                .map(|r| RuleStatus {
                    name: r.name,
                    evaluated: r.stats.evaluated,
                    matched: r.stats.matched,
                    emitted: r.stats.emitted,
                    unreadable: r.stats.unreadable,
                    late: r.stats.late,
                    evicted: r.stats.evicted,
                    groups: r.stats.groups,
                    active: r.stats.active,
                    evaluation_seconds: r.stats.eval_ns as f64 / 1e9,
                })
                .collect(),
            rules_suppressed: s.rules_suppressed.load(Relaxed),
            last_error: s.last_error().map(|e| ErrorStatus {
                unix: e.unix,
                level: e.level.into(),
                message: e.message,
            }),
        }
    }
}

impl StatusReport {
    /// A report for a gateway that is not running (or cannot be asked), from its outbox
    /// database opened read-only, and the disk. Blocking.
    pub(crate) fn from_outbox(config: &Config, state: RunState, detail: String) -> StatusReport {
        let data_dir = &config.gateway.data_dir;
        let path = db::path_in(data_dir);
        let now_us = chrono::Utc::now().timestamp_micros();
        let (outbox, outbox_error) = match read_outbox(&path) {
            Ok((pending, dead_letters)) => (
                Some(OutboxStatus {
                    path: path.display().to_string(),
                    waiting: pending.count,
                    waiting_bytes: pending.bytes,
                    oldest_time_us: pending.oldest_time_us,
                    oldest_age_seconds: crate::sources::health::oldest_age_seconds(
                        &crate::outbox::Depth {
                            pending,
                            dead_letters,
                        },
                        now_us,
                    ),
                    dead_letters,
                    waiting_files: pending.files,
                    waiting_file_bytes: pending.file_bytes,
                }),
                None,
            ),
            Err(e) => (None, Some(e)),
        };
        StatusReport {
            gateway: config.gateway.id.to_string(),
            state,
            state_detail: Some(detail),
            at_unix: now_us.div_euclid(1_000_000),
            relay_url: config.relay.url.clone(),
            mqtt_broker: config
                .mqtt
                .as_ref()
                .map(|m| format!("{}:{}", m.host, m.port)),
            outbox,
            outbox_error,
            disk: host::disk_space(data_dir).ok().map(|d| DiskStatus {
                free_bytes: d.free_bytes,
                total_bytes: d.total_bytes,
            }),
            live: None,
        }
    }
}

fn read_outbox(path: &Path) -> Result<(crate::outbox::Pending, u64), String> {
    if !path.exists() {
        let path = path.display().to_string();
        return Err(crate::outbox::OutboxError::Missing { path }.to_string());
    }
    let reader = OutboxReader::open(path)
        .map_err(|e| format!("cannot open the outbox {}: {e}", path.display()))?;
    let pending = reader
        .pending()
        .map_err(|e| format!("cannot read the outbox {}: {e}", path.display()))?;
    let dead = reader
        .dead_letters()
        .map_err(|e| format!("cannot read the outbox {}: {e}", path.display()))?;
    Ok((pending, dead))
}

/// The summary for a person at a terminal.
pub(crate) fn render_text(r: &StatusReport) -> String {
    let mut t = Text {
        out: String::new(),
        now: r.at_unix,
    };
    t.headline(r);
    t.connections(r);
    t.waiting(r);
    if let Some(l) = &r.live {
        t.traffic(l);
    }
    if let Some(o) = &r.outbox {
        t.dead_letters(o);
    }
    if let Some(d) = &r.disk {
        t.disk(r, d);
    }
    if let Some(l) = &r.live {
        t.last_error_and_heartbeats(l);
        t.subscriptions(l);
        t.rules(l);
    }
    if r.state == RunState::Stopped {
        t.out.push_str(
            "\nThe numbers above are read from the outbox. To see why the gateway stopped:\n  journalctl -u pigeon-gateway -n 50\n",
        );
    }
    t.out
}

/// [`render_text`]'s output as it grows, and the report's time.
struct Text {
    out: String,
    now: i64,
}

impl Text {
    fn row(&mut self, label: &str, text: String) {
        let _ = writeln!(self.out, "  {label:<14} {text}");
    }

    /// "3 min ago" for a Unix time.
    fn ago(&self, unix: i64) -> String {
        format!(
            "{} ago",
            human_duration(self.now.saturating_sub(unix).max(0) as u64)
        )
    }

    /// Which gateway, and whether it runs and takes data.
    fn headline(&mut self, r: &StatusReport) {
        let out = &mut self.out;
        let _ = write!(out, "pigeon-gateway {}: ", r.gateway);
        match (&r.state, &r.live) {
            (RunState::Running, Some(l)) => {
                let taking = match &l.not_ready_reason {
                    None => "running and taking data".to_owned(),
                    Some(why) => format!("running, but NOT taking data: {why}"),
                };
                let _ = writeln!(
                    out,
                    "{taking}\n  (pid {}, version {}, up {})",
                    l.pid,
                    l.version,
                    human_duration(l.uptime_seconds)
                );
            }
            (RunState::Running, None) => {
                let _ = writeln!(out, "running");
            }
            (RunState::Stopped, _) => {
                let _ = writeln!(out, "NOT RUNNING");
            }
            (RunState::Unknown, _) => {
                let _ = writeln!(out, "state unknown");
            }
        }
        if let Some(d) = &r.state_detail {
            let _ = writeln!(out, "  ({d})");
        }
        out.push('\n');
    }

    /// The MQTT broker and the relay: whether connected (when running), else where.
    fn connections(&mut self, r: &StatusReport) {
        let Some(l) = &r.live else {
            self.row("Relay", r.relay_url.clone());
            if let Some(broker) = &r.mqtt_broker {
                self.row("MQTT broker", broker.clone());
            }
            return;
        };
        if let Some(broker) = &r.mqtt_broker {
            let state = if l.mqtt_connected == Some(true) {
                "connected to"
            } else {
                "NOT connected to"
            };
            self.row(
                "MQTT broker",
                format!(
                    "{state} {broker}; {} received since the start{}",
                    counted(l.mqtt_received, "message", "messages"),
                    if l.mqtt_oversized > 0 {
                        format!(
                            ", {} DROPPED as too large (mqtt.max_packet_size, relay.max_event_bytes)",
                            count(l.mqtt_oversized)
                        )
                    } else {
                        String::new()
                    }
                ),
            );
        }
        let last = match l.last_upload_unix {
            Some(t) => format!("last upload {}", self.ago(t)),
            None => "no upload since the start".to_owned(),
        };
        let relay = match l.relay_reachable {
            Some(true) => format!("reachable at {}; {last}", r.relay_url),
            Some(false) => format!(
                "NOT reachable at {} ({last}); events wait in the outbox",
                r.relay_url
            ),
            None => format!("{} (not contacted yet: nothing to send)", r.relay_url),
        };
        self.row("Relay", relay);
    }

    /// What waits in the outbox, and since when.
    fn waiting(&mut self, r: &StatusReport) {
        match (&r.outbox, &r.outbox_error) {
            (Some(o), _) => {
                let waiting = if o.waiting == 0 {
                    "nothing: everything has been delivered".to_owned()
                } else {
                    let since = o
                        .oldest_time_us
                        .map(|t| {
                            format!(
                                ", the oldest received {}",
                                self.ago(t.div_euclid(1_000_000))
                            )
                        })
                        .unwrap_or_default();
                    let files = if o.waiting_files > 0 {
                        format!(
                            ", of them {} ({})",
                            counted(o.waiting_files, "file", "files"),
                            human_bytes(o.waiting_file_bytes)
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "{} ({}){files}{since}",
                        counted(o.waiting, "event", "events"),
                        human_bytes(o.waiting_bytes)
                    )
                };
                self.row("Waiting", waiting);
            }
            (None, Some(e)) => self.row("Waiting", format!("unknown: {e}")),
            (None, None) => {}
        }
    }

    /// What went to the relay since the start, the outbox budget and the files.
    fn traffic(&mut self, l: &LiveStatus) {
        self.row(
            "Delivered",
            format!(
                "{} since the start ({} already at the relay), {} sent",
                counted(l.events_delivered, "event", "events"),
                count(l.events_duplicate),
                human_bytes(l.upload_bytes)
            ),
        );
        self.row(
            "Uploads",
            format!(
                "{}, {} answered, {} failed, {}",
                counted(l.upload_requests, "request", "requests"),
                count(l.upload_successes),
                count(l.upload_failures),
                counted(l.upload_retries, "retry", "retries")
            ),
        );
        if l.outbox_dropped > 0 || l.outbox_refused > 0 || l.outbox_max_bytes.is_some() {
            self.row("Outbox budget", outbox_budget(l));
        }
        if let Some(f) = &l.files {
            self.row("Files", files_line(f));
        }
    }

    fn dead_letters(&mut self, o: &OutboxStatus) {
        let text = if o.dead_letters == 0 {
            "none".to_owned()
        } else {
            format!(
                "{} the relay rejected (kept in the outbox's dead_letters table)",
                counted(o.dead_letters, "event", "events")
            )
        };
        self.row("Dead letters", text);
    }

    /// Free space on the data directory's filesystem.
    fn disk(&mut self, r: &StatusReport, d: &DiskStatus) {
        let pct = if d.total_bytes > 0 {
            d.free_bytes as f64 * 100.0 / d.total_bytes as f64
        } else {
            0.0
        };
        let dir = r
            .outbox
            .as_ref()
            .and_then(|o| Path::new(&o.path).parent().map(|p| p.display().to_string()))
            .unwrap_or_default();
        self.row(
            "Disk",
            format!(
                "{} free of {} ({pct:.0}%) on the filesystem of {dir}",
                human_bytes(d.free_bytes),
                human_bytes(d.total_bytes)
            ),
        );
    }

    fn last_error_and_heartbeats(&mut self, l: &LiveStatus) {
        let text = match &l.last_error {
            None => "none since the start".to_owned(),
            Some(e) => format!("{} ({}): {}", self.ago(e.unix), e.level, e.message),
        };
        self.row("Last error", text);
        self.row(
            "Heartbeats",
            format!("{} sent since the start", count(l.heartbeats)),
        );
    }

    /// A table of the events stored per MQTT subscription, in columns.
    fn subscriptions(&mut self, l: &LiveStatus) {
        if l.subscriptions.is_empty() {
            return;
        }
        let out = &mut self.out;
        out.push_str("\nPer MQTT subscription (events stored since the start):\n");
        let width = l
            .subscriptions
            .iter()
            .map(|s| s.filter.len())
            .max()
            .unwrap_or(0)
            .max("(no filter)".len());
        let counts: Vec<String> = l.subscriptions.iter().map(|s| count(s.records)).collect();
        let cw = counts
            .iter()
            .map(String::len)
            .chain([count(l.mqtt_unmatched).len()])
            .max()
            .unwrap_or(1);
        for (s, c) in l.subscriptions.iter().zip(&counts) {
            let _ = writeln!(out, "  {:<width$}  {c:>cw$}  {}", s.filter, s.event_type);
        }
        if l.mqtt_unmatched > 0 {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>cw$}  (topics no filter matches)",
                "(no filter)",
                count(l.mqtt_unmatched)
            );
        }
    }
}

impl Text {
    fn rules(&mut self, l: &LiveStatus) {
        if l.rules.is_empty() {
            return;
        }
        let out = &mut self.out;
        let _ = writeln!(
            out,
            "\nEdge rules (since the start; {} kept from the relay):",
            counted(l.rules_suppressed, "reading", "readings")
        );
        let width = l.rules.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &l.rules {
            let mut line = format!(
                "  {:<width$}  {} matched, {} derived, {}",
                r.name,
                count(r.matched),
                count(r.emitted),
                counted(r.groups, "group", "groups"),
            );
            if r.active > 0 {
                let _ = write!(line, " ({} active)", count(r.active));
            }
            for (n, what) in [
                (r.late, "late"),
                (r.unreadable, "unreadable"),
                (r.evicted, "groups dropped at max_groups"),
            ] {
                if n > 0 {
                    let _ = write!(line, ", {} {what}", count(n));
                }
            }
            let _ = writeln!(out, "{line}");
        }
    }
}

/// The outbox's use of its budget, and what a full outbox dropped or refused.
fn outbox_budget(l: &LiveStatus) -> String {
    let mut text = match l.outbox_max_bytes {
        Some(max) => format!(
            "{} used of {} (outbox.max_bytes)",
            human_bytes(l.outbox_used_bytes),
            human_bytes(max)
        ),
        None => format!("{} used", human_bytes(l.outbox_used_bytes)),
    };
    if l.outbox_dropped > 0 {
        text.push_str(&format!(
            "; FULL: {} ({}) dropped to make room",
            counted(l.outbox_dropped, "event", "events"),
            human_bytes(l.outbox_dropped_bytes)
        ));
    }
    if l.outbox_refused > 0 {
        text.push_str(&format!(
            "; {} refused (when_full = \"refuse\")",
            count(l.outbox_refused)
        ));
    }
    text
}

/// Files picked up and delivered, and what is happening to files now.
fn files_line(f: &FilesStatus) -> String {
    let mut text = format!(
        "{} picked up ({}), {} delivered ({} sent)",
        counted(f.picked_up, "file", "files"),
        human_bytes(f.picked_up_bytes),
        count(f.delivered),
        human_bytes(f.bytes_sent)
    );
    if f.uploading > 0 {
        text.push_str(&format!(", {} uploading now", count(f.uploading)));
    }
    if f.being_written > 0 {
        text.push_str(&format!(
            ", {} being written by cameras",
            count(f.being_written)
        ));
    }
    if f.resumed > 0 {
        text.push_str(&format!(
            ", {} resumed",
            counted(f.resumed, "upload", "uploads")
        ));
    }
    if f.failing > 0 {
        text.push_str(&format!(
            "; {} cannot be picked up (see the log)",
            counted(f.failing, "file", "files")
        ));
    }
    text
}

/// `n` with its noun: "1 message", "2,000 messages".
pub(crate) fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", count(n), if n == 1 { one } else { many })
}

/// `1234567` → `"1,234,567"`.
pub(crate) fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1536` → `"1.5 KiB"`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3725` → `"1 h 2 min"`; two units at most.
pub(crate) fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) => format!("{m} min {s} s"),
        (0, _, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report of a busy gateway, for the renderers' tests.
    pub(crate) fn sample_report() -> StatusReport {
        StatusReport {
            gateway: "pi-1".into(),
            state: RunState::Running,
            state_detail: None,
            at_unix: 1_800_000_000,
            relay_url: "https://relay.example.com".into(),
            mqtt_broker: Some("127.0.0.1:1883".into()),
            outbox: Some(OutboxStatus {
                path: "/var/lib/pigeon/outbox.db".into(),
                waiting: 12,
                waiting_bytes: 3_004_300,
                oldest_time_us: Some(1_799_999_995_000_000),
                oldest_age_seconds: Some(5.0),
                dead_letters: 0,
                waiting_files: 2,
                waiting_file_bytes: 3_000_000,
            }),
            outbox_error: None,
            disk: Some(DiskStatus {
                free_bytes: 12 << 30,
                total_bytes: 29 << 30,
            }),
            live: Some(LiveStatus {
                pid: 4242,
                version: "0.1.0".into(),
                started_unix: 1_799_992_500,
                uptime_seconds: 7500,
                ready: true,
                not_ready_reason: None,
                mqtt_connected: Some(true),
                mqtt_received: 10_250,
                mqtt_oversized: 0,
                relay_reachable: Some(true),
                last_upload_unix: Some(1_799_999_997),
                upload_requests: 40,
                upload_successes: 39,
                upload_failures: 1,
                upload_retries: 1,
                upload_bytes: 1_300_000,
                events_delivered: 10_234,
                events_duplicate: 2,
                events_dead_lettered: 0,
                outbox_commits: 300,
                outbox_commit_failures: 0,
                outbox_expired: 0,
                outbox_dropped: 1_200,
                outbox_dropped_bytes: 52_000_000,
                outbox_refused: 3,
                outbox_used_bytes: 1_900_000_000,
                outbox_max_bytes: Some(2 << 30),
                heartbeats: 125,
                sources: vec![
                    SourceCount {
                        name: "mqtt".into(),
                        records: 10_246,
                    },
                    SourceCount {
                        name: "health".into(),
                        records: 125,
                    },
                ],
                subscriptions: vec![
                    SubscriptionCount {
                        filter: "org/+/alarms/#".into(),
                        event_type: "com.example.alarm".into(),
                        records: 46,
                    },
                    SubscriptionCount {
                        filter: "org/#".into(),
                        event_type: "com.example.reading".into(),
                        records: 10_200,
                    },
                ],
                mqtt_unmatched: 0,
                files: Some(FilesStatus {
                    picked_up: 40,
                    picked_up_bytes: 90_000_000,
                    pickup_errors: 1,
                    failing: 1,
                    being_written: 1,
                    delivered: 38,
                    bytes_sent: 87_000_000,
                    resumed: 1,
                    uploading: 1,
                }),
                rules: vec![
                    RuleStatus {
                        name: "fire".into(),
                        evaluated: 10_200,
                        matched: 4_100,
                        emitted: 2,
                        unreadable: 0,
                        late: 0,
                        evicted: 0,
                        groups: 12,
                        active: 1,
                        evaluation_seconds: 0.25,
                    },
                    RuleStatus {
                        name: "hvac-drift".into(),
                        evaluated: 10_200,
                        matched: 6_000,
                        emitted: 31,
                        unreadable: 3,
                        late: 7,
                        evicted: 0,
                        groups: 40,
                        active: 0,
                        evaluation_seconds: 0.5,
                    },
                ],
                rules_suppressed: 5_000,
                last_error: Some(ErrorStatus {
                    unix: 1_799_999_000,
                    level: "warn".into(),
                    message: "Cannot deliver to the relay; events stay in the outbox and will be retried. reason=HTTP 503".into(),
                }),
            }),
        }
    }

    #[test]
    fn a_running_gateway_in_words() {
        let text = render_text(&sample_report());
        for expected in [
            "pigeon-gateway pi-1: running and taking data",
            "(pid 4242, version 0.1.0, up 2 h 5 min)",
            "MQTT broker    connected to 127.0.0.1:1883; 10,250 messages received",
            "Relay          reachable at https://relay.example.com; last upload 3 s ago",
            "Waiting        12 events (2.9 MiB), of them 2 files (2.9 MiB), the oldest received 5 s ago",
            "Outbox budget  1.8 GiB used of 2.0 GiB (outbox.max_bytes); FULL: 1,200 events (49.6 MiB) dropped to make room; 3 refused (when_full = \"refuse\")",
            "Files          40 files picked up (85.8 MiB), 38 delivered (83.0 MiB sent), 1 uploading now, 1 being written by cameras, 1 upload resumed; 1 file cannot be picked up (see the log)",
            "Delivered      10,234 events since the start (2 already at the relay), 1.2 MiB sent",
            "Dead letters   none",
            "Disk           12.0 GiB free of 29.0 GiB (41%) on the filesystem of /var/lib/pigeon",
            "Last error     16 min 40 s ago (warn): Cannot deliver",
            "  org/+/alarms/#      46  com.example.alarm",
            "  org/#           10,200  com.example.reading",
            "Edge rules (since the start; 5,000 readings kept from the relay):",
            "  fire        4,100 matched, 2 derived, 12 groups (1 active)\n",
            "  hvac-drift  6,000 matched, 31 derived, 40 groups, 7 late, 3 unreadable\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn a_stopped_gateway_in_words() {
        let mut r = sample_report();
        r.state = RunState::Stopped;
        r.state_detail = Some("nothing answers at http://127.0.0.1:9464".into());
        r.live = None;
        let text = render_text(&r);
        assert!(
            text.starts_with(
                "pigeon-gateway pi-1: NOT RUNNING\n  (nothing answers at http://127.0.0.1:9464)"
            ),
            "{text}"
        );
        assert!(text.contains("Waiting        12 events"), "{text}");
        assert!(!text.contains("Delivered"), "{text}");
        assert!(text.contains("journalctl -u pigeon-gateway"), "{text}");
        r.outbox = None;
        r.outbox_error = Some("there is no outbox at /x/outbox.db".into());
        assert!(render_text(&r).contains("Waiting        unknown: there is no outbox"));
    }

    #[test]
    fn the_report_round_trips_through_json() {
        let r = sample_report();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""state":"running""#), "{json}");
        assert!(json.contains(r#""type":"com.example.alarm""#), "{json}");
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn units_for_people() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(counted(1, "message", "messages"), "1 message");
        assert_eq!(counted(0, "retry", "retries"), "0 retries");
        assert_eq!(counted(2_000, "event", "events"), "2,000 events");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(59), "59 s");
        assert_eq!(human_duration(61), "1 min 1 s");
        assert_eq!(human_duration(3725), "1 h 2 min");
        assert_eq!(human_duration(90_000), "1 d 1 h");
    }
}
