//! The health source: periodic heartbeat events about the Pi and the gateway itself.
//!
//! Every `[health] interval` (the first a few seconds after the start) it samples CPU use
//! (averaged since the previous sample), memory, load averages, uptime (sysinfo), free
//! space of the filesystem holding the data directory, the SoC temperature where the
//! board reports one, and the outbox backlog, and commits one CloudEvent of type
//! [`HEARTBEAT_TYPE`] from `/gateways/<id>/health` with that as JSON `data`. It goes
//! through the outbox like any reading, so a gateway that was offline delivers its
//! history of heartbeats when it is back.
//!
//! One file rather than a folder like `mqtt/`: the config is two keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use pigeon_shared::ce::GatewayId;
use pigeon_shared::shutdown::Shutdown;
use pigeon_shared::units::Duration;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::host::{self, DiskSpace};
use crate::outbox::{Depth, DepthCache, NewRecord, OutboxWriter};
use crate::stats::Stats;

/// The CloudEvent `type` of heartbeats.
pub(crate) const HEARTBEAT_TYPE: &str = "io.pigeon.gateway.heartbeat";

/// How long after the start the first heartbeat is taken (CPU use needs two samples).
const FIRST_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// `[health]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthConfig {
    #[serde(default = "crate::config::default_true")]
    pub(crate) enabled: bool,
    #[serde(default = "default_interval")]
    pub(crate) interval: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_interval(),
        }
    }
}

impl HealthConfig {
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let i = self.interval.get();
        if i < std::time::Duration::from_secs(1) || i > std::time::Duration::from_secs(86_400) {
            return Err(("health.interval", "must be between 1s and 1d".into()));
        }
        Ok(())
    }
}

/// A heartbeat's `data`. Field names carry their units; absent readings are `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Heartbeat {
    /// pigeon-gateway's version.
    pub(crate) version: String,
    /// All CPUs, averaged since the previous heartbeat (0–100).
    pub(crate) cpu_percent: f64,
    pub(crate) cpu_count: usize,
    pub(crate) memory_total_bytes: u64,
    pub(crate) memory_used_bytes: u64,
    pub(crate) memory_available_bytes: u64,
    pub(crate) swap_total_bytes: u64,
    pub(crate) swap_used_bytes: u64,
    pub(crate) load_1m: Option<f64>,
    pub(crate) load_5m: Option<f64>,
    pub(crate) load_15m: Option<f64>,
    /// Since the machine booted.
    pub(crate) uptime_seconds: Option<u64>,
    /// Since this gateway process started.
    pub(crate) process_uptime_seconds: u64,
    /// The filesystem holding `data_dir`.
    pub(crate) disk_path: String,
    pub(crate) disk_total_bytes: Option<u64>,
    pub(crate) disk_free_bytes: Option<u64>,
    /// The SoC (CPU) temperature, where the board reports one.
    pub(crate) temperature_c: Option<f64>,
    /// Records waiting in the outbox (this heartbeat not included).
    pub(crate) outbox_depth: Option<u64>,
    pub(crate) outbox_bytes: Option<u64>,
    /// Age of the oldest waiting record; `null` when nothing waits.
    pub(crate) outbox_oldest_age_seconds: Option<f64>,
    pub(crate) outbox_dead_letters: Option<u64>,
    pub(crate) mqtt_connected: bool,
    pub(crate) relay_reachable: bool,
}

/// Samples the machine; holds sysinfo's state between samples (for CPU use).
pub(crate) struct Sampler {
    system: Option<sysinfo::System>,
    data_dir: PathBuf,
}

impl Sampler {
    pub(crate) fn new(data_dir: PathBuf) -> Self {
        let system = match sysinfo::System::new() {
            Ok(mut s) => {
                s.refresh_cpu_usage();
                Some(s)
            }
            Err(e) => {
                warn!(error = %e, "Cannot read CPU and memory figures; heartbeats will show zeros for them.");
                None
            }
        };
        Self { system, data_dir }
    }

    /// A heartbeat (blocking: reads /proc and /sys; run it off the reactor).
    pub(crate) fn sample(
        &mut self,
        started: Instant,
        depth: Option<Depth>,
        stats: &Stats,
    ) -> Heartbeat {
        let mut hb = Heartbeat {
            version: env!("CARGO_PKG_VERSION").into(),
            cpu_percent: 0.0,
            cpu_count: 0,
            memory_total_bytes: 0,
            memory_used_bytes: 0,
            memory_available_bytes: 0,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
            load_1m: None,
            load_5m: None,
            load_15m: None,
            uptime_seconds: sysinfo::System::uptime().ok(),
            process_uptime_seconds: started.elapsed().as_secs(),
            disk_path: self.data_dir.display().to_string(),
            disk_total_bytes: None,
            disk_free_bytes: None,
            temperature_c: host::soc_temperature(),
            outbox_depth: depth.map(|d| d.pending.count),
            outbox_bytes: depth.map(|d| d.pending.bytes),
            outbox_oldest_age_seconds: depth.and_then(|d| oldest_age_seconds(&d, now_us())),
            outbox_dead_letters: depth.map(|d| d.dead_letters),
            mqtt_connected: stats.mqtt_connected.load(Relaxed),
            relay_reachable: stats.relay_reachable.load(Relaxed),
        };
        if let Some(s) = &mut self.system {
            s.refresh_cpu_usage();
            s.refresh_memory();
            hb.cpu_percent = round2(f64::from(s.global_cpu_usage()));
            hb.cpu_count = s.cpus().len();
            hb.memory_total_bytes = s.total_memory();
            hb.memory_used_bytes = s.used_memory();
            hb.memory_available_bytes = s.available_memory();
            hb.swap_total_bytes = s.total_swap();
            hb.swap_used_bytes = s.used_swap();
        }
        if let Ok(l) = sysinfo::System::load_average() {
            (hb.load_1m, hb.load_5m, hb.load_15m) = (Some(l.one), Some(l.five), Some(l.fifteen));
        }
        if let Ok(DiskSpace {
            total_bytes,
            free_bytes,
        }) = host::disk_space(&self.data_dir)
        {
            (hb.disk_total_bytes, hb.disk_free_bytes) = (Some(total_bytes), Some(free_bytes));
        }
        hb
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Seconds since the oldest waiting record was received, if any waits.
pub(crate) fn oldest_age_seconds(depth: &Depth, now_us: i64) -> Option<f64> {
    depth
        .pending
        .oldest_time_us
        .map(|t| round2(now_us.saturating_sub(t).max(0) as f64 / 1e6))
}

/// The outbox record for one heartbeat.
pub(crate) fn heartbeat_record(source: &str, hb: &Heartbeat, time_us: i64) -> NewRecord {
    NewRecord {
        expires_us: None,
        source: source.to_owned(),
        event_type: HEARTBEAT_TYPE.to_owned(),
        subject: None,
        time_us,
        content_type: Some("application/json".to_owned()),
        // A struct of numbers, strings and options always serialises.
        data: Bytes::from(serde_json::to_vec(hb).unwrap_or_default()),
        delivery: None,
        file: None,
        policy: crate::outbox::Policy::default(),
    }
}

/// The running health source.
pub(crate) struct HealthSource {
    config: HealthConfig,
    source: String,
    data_dir: PathBuf,
    writer: OutboxWriter,
    stats: Arc<Stats>,
    depth: Arc<DepthCache>,
    started: Instant,
}

impl HealthSource {
    pub(crate) fn new(
        config: HealthConfig,
        gateway: &GatewayId,
        data_dir: PathBuf,
        writer: OutboxWriter,
        stats: Arc<Stats>,
        depth: Arc<DepthCache>,
        started: Instant,
    ) -> Self {
        Self {
            config,
            source: gateway.source("health"),
            data_dir,
            writer,
            stats,
            depth,
            started,
        }
    }

    /// Commits a heartbeat soon after the start and then every interval, until
    /// `shutdown` stops it.
    pub(crate) async fn run(self, mut shutdown: Shutdown) {
        let mut sampler = Some(Sampler::new(self.data_dir.clone()));
        let mut delay = FIRST_AFTER;
        loop {
            if shutdown.stopped_within(delay).await {
                break;
            }
            delay = self.config.interval.get();
            let depth = self.depth.get().await.ok();
            let Some(mut s) = sampler.take() else { break };
            let stats = self.stats.clone();
            let started = self.started;
            let Ok((s, hb)) = tokio::task::spawn_blocking(move || {
                let hb = s.sample(started, depth, &stats);
                (s, hb)
            })
            .await
            else {
                warn!("Sampling the machine's health failed; no more heartbeats.");
                break;
            };
            sampler = Some(s);
            let record = heartbeat_record(&self.source, &hb, now_us());
            match self.writer.append_and_wait(record).await {
                Ok(_) => {
                    self.stats.heartbeats.fetch_add(1, Relaxed);
                    debug!(
                        cpu_percent = hb.cpu_percent,
                        outbox_depth = hb.outbox_depth,
                        "Heartbeat committed."
                    );
                }
                Err(e) => warn!(error = %e, "Could not commit a heartbeat."),
            }
        }
        debug!("The health source stopped.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Pending;

    #[test]
    fn config_defaults_and_bounds() {
        let c: HealthConfig = toml::from_str("").unwrap();
        assert!(c.enabled);
        assert_eq!(c.interval.get().as_secs(), 60);
        c.validate().unwrap();
        let c: HealthConfig = toml::from_str("interval = \"2d\"").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "health.interval");
    }

    #[test]
    fn a_sample_of_this_machine_is_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path().to_owned());
        let depth = Depth {
            pending: Pending {
                count: 3,
                bytes: 120,
                min_seq: Some(7),
                oldest_time_us: Some(now_us() - 5_000_000),
                ..Pending::default()
            },
            dead_letters: 1,
        };
        let hb = s.sample(Instant::now(), Some(depth), &Stats::default());
        assert!(hb.memory_total_bytes > 0, "{hb:?}");
        assert!(hb.memory_used_bytes <= hb.memory_total_bytes, "{hb:?}");
        assert!(hb.cpu_count > 0, "{hb:?}");
        assert!((0.0..=100.0).contains(&hb.cpu_percent), "{hb:?}");
        assert!(hb.disk_free_bytes.unwrap() > 0, "{hb:?}");
        assert!(hb.uptime_seconds.unwrap() > 0, "{hb:?}");
        assert_eq!(hb.outbox_depth, Some(3));
        let age = hb.outbox_oldest_age_seconds.unwrap();
        assert!((5.0..60.0).contains(&age), "{age}");

        let rec = heartbeat_record("/gateways/g/health", &hb, 42);
        assert_eq!(rec.event_type, HEARTBEAT_TYPE);
        let back: Heartbeat = serde_json::from_slice(&rec.data).unwrap();
        assert_eq!(back, hb);
    }

    #[test]
    fn nothing_waiting_has_no_age() {
        assert_eq!(oldest_age_seconds(&Depth::default(), 1), None);
    }
}
