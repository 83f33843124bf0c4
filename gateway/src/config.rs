//! The gateway's configuration file (TOML).
//!
//! [`Config::from_toml`] parses and validates in one step; every error names the key and
//! what is wrong with it. Unknown keys are errors, so a typo never silently falls back to
//! a default. [`DEFAULT_CONFIG`] is the commented file `print-default-config` prints and
//! the docs show; a test keeps it parseable.

use std::path::{Path, PathBuf};

use pigeon_shared::ce::GatewayId;
use pigeon_shared::units::{ByteSize, Duration};
use serde::Deserialize;

use crate::outbox::db::Synchronous;
use crate::sources::files::FilesConfig;
use crate::sources::health::HealthConfig;
use crate::sources::mqtt::MqttConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) gateway: GatewaySection,
    pub(crate) relay: RelayConfig,
    #[serde(default)]
    pub(crate) outbox: OutboxConfig,
    /// Absent: no MQTT source.
    pub(crate) mqtt: Option<MqttConfig>,
    /// Absent: no drop directories are watched.
    pub(crate) files: Option<FilesConfig>,
    #[serde(default)]
    pub(crate) health: HealthConfig,
    #[serde(default)]
    pub(crate) http: HttpConfig,
    /// Edge rules (docs/rules.md): alarms, windows, report by exception, silent sensors.
    #[serde(default)]
    pub(crate) rules: Vec<pigeon_rules::RuleConfig>,
}

/// The local HTTP endpoint: `/live`, `/ready`, `/metrics`, `/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    #[serde(default = "default_true")]
    pub(crate) enabled: bool,
    /// `host:port`; loopback by default, since `/status` tells anyone who can reach it
    /// what the gateway is doing.
    #[serde(default = "default_http_listen")]
    pub(crate) listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_http_listen(),
        }
    }
}

impl HttpConfig {
    /// The address to listen on; `validate` made sure it parses.
    pub(crate) fn listen_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.listen.parse().map_err(|e| {
            format!(
                "{:?} is not an address like \"127.0.0.1:9464\": {e}",
                self.listen
            )
        })
    }
}

pub(crate) fn default_true() -> bool {
    true
}
fn default_http_listen() -> String {
    "127.0.0.1:9464".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GatewaySection {
    /// Names this gateway in event sources and at the relay.
    pub(crate) id: GatewayId,
    /// Where the outbox database (and later the file spool) lives.
    #[serde(default = "default_data_dir")]
    pub(crate) data_dir: PathBuf,
    /// How long a graceful stop may take before in-flight work is abandoned (it stays in
    /// the outbox and is sent after the next start).
    #[serde(default = "default_shutdown_timeout")]
    pub(crate) shutdown_timeout: Duration,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/pigeon")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A time-of-day window with its own upload limit: `from = "22:00"`, `to = "06:00"`
/// (crossing midnight is fine), `max_upload_rate = "1MiB"` or left out for no limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadWindow {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) max_upload_rate: Option<ByteSize>,
}

/// `"HH:MM"` → minutes after midnight.
fn minutes_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl RelayConfig {
    /// The upload limit in bytes per second at `minute` (after local midnight): the first
    /// schedule window containing it, else `max_upload_rate`. `None`: no limit.
    pub(crate) fn upload_rate_at(&self, minute: u32) -> Option<u64> {
        for w in &self.upload_schedule {
            let (Some(from), Some(to)) = (minutes_of_day(&w.from), minutes_of_day(&w.to)) else {
                continue;
            };
            let inside = if from < to {
                (from..to).contains(&minute)
            } else {
                minute >= from || minute < to
            };
            if inside {
                return w.max_upload_rate.map(|r| r.get());
            }
        }
        self.max_upload_rate.map(|r| r.get())
    }
}

/// How to reach the relay and how to batch uploads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelayConfig {
    /// Base URL of the relay, e.g. `https://relay.example.com`; events go to `<url>/v1/events`.
    pub(crate) url: String,
    /// The bearer token the relay knows this gateway by.
    pub(crate) token: Option<String>,
    /// A file holding the token (first line; surrounding white space ignored).
    pub(crate) token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an https relay instead of the system's.
    #[serde(default)]
    pub(crate) ca_file: Option<PathBuf>,
    /// PEM client certificate (and chain) presented to the relay: the gateway's identity
    /// when the relay asks for one (its subject CN is the gateway id there).
    #[serde(default)]
    pub(crate) client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub(crate) client_key: Option<PathBuf>,
    #[serde(default = "default_batch_max_events")]
    pub(crate) batch_max_events: usize,
    #[serde(default = "default_batch_max_bytes")]
    pub(crate) batch_max_bytes: ByteSize,
    /// How long events of the default priority or lower may wait for others to share a
    /// request with, when fewer than a full batch are waiting. Each request ends in a
    /// commit on the SD card: at a few readings a second, sending each on its own writes
    /// several times more. Events above the default priority never wait. `0s`: none.
    #[serde(default = "default_batch_linger")]
    pub(crate) batch_linger: Duration,
    #[serde(default = "default_request_timeout")]
    pub(crate) request_timeout: Duration,
    #[serde(default = "default_backoff_initial")]
    pub(crate) backoff_initial: Duration,
    #[serde(default = "default_backoff_max")]
    pub(crate) backoff_max: Duration,
    #[serde(default)]
    pub(crate) compression: Compression,
    /// Upload bandwidth limit, bytes per second of request bodies as sent (compressed);
    /// none by default.
    #[serde(default)]
    pub(crate) max_upload_rate: Option<ByteSize>,
    /// Times of day (the Pi's local time) with another limit, e.g. full speed at night.
    #[serde(default)]
    pub(crate) upload_schedule: Vec<UploadWindow>,
    /// Files uploaded at the same time (each over its own connection, beside the event
    /// batches), so that snapshots do not wait behind a long video.
    #[serde(default = "default_max_file_uploads")]
    pub(crate) max_file_uploads: usize,
    /// Give up on an event (or file) after the relay answered this many attempts with an
    /// error (5xx, 429): it goes to the dead-letter table with the last reason. Attempts
    /// that did not reach the relay do not count. None: retry for ever.
    #[serde(default)]
    pub(crate) max_attempts: Option<u32>,
    /// The relay's `limits.max_event_bytes`: the longest event, as structured JSON, the
    /// relay takes. An MQTT message whose event would be longer is refused at ingest
    /// instead of being acknowledged and then dead-lettered, and `mqtt.max_packet_size`
    /// must not let through binary messages that long. Change it with the relay's.
    #[serde(default = "default_max_event_bytes")]
    pub(crate) max_event_bytes: ByteSize,
}

/// pigeon-relay's default `limits.max_event_bytes`: room for the largest event of a
/// message of the default `mqtt.max_packet_size` (1 MiB, base64: 1.33 MiB).
fn default_max_event_bytes() -> ByteSize {
    ByteSize::mib(2)
}

fn default_max_file_uploads() -> usize {
    2
}

fn default_batch_max_events() -> usize {
    1000
}
fn default_batch_max_bytes() -> ByteSize {
    ByteSize::mib(1)
}
fn default_batch_linger() -> Duration {
    Duration::from_secs(1)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

/// Content-Encoding of upload bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compression {
    #[default]
    Gzip,
    None,
}

/// Outbox durability and batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutboxConfig {
    /// `full`: every commit survives a power cut (fsync of the WAL per transaction).
    /// `normal`: survives a crash of the process but the last transactions may be lost
    /// on power loss. Producers are acknowledged after the commit either way.
    #[serde(default)]
    pub(crate) synchronous: Synchronous,
    /// The most records one transaction commits (group commit).
    #[serde(default = "default_commit_max_records")]
    pub(crate) commit_max_records: usize,
    /// The most disk the outbox and the spool may use together. None: no cap (only
    /// `min_free`).
    #[serde(default)]
    pub(crate) max_bytes: Option<ByteSize>,
    /// Space to leave free on the filesystems of the data dir and the spool, for the
    /// rest of the Pi. None: 100 MiB, or 5% of a filesystem smaller than 2 GiB.
    #[serde(default)]
    pub(crate) min_free: Option<ByteSize>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::default(),
            commit_max_records: default_commit_max_records(),
            max_bytes: None,
            min_free: None,
        }
    }
}

fn default_commit_max_records() -> usize {
    4096
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// A configuration error: the key at fault and what is wrong with it.
type Invalid = (&'static str, String);

impl RelayConfig {
    /// Checks `[relay]`, key by key in the order of the default configuration.
    fn validate(&self) -> Result<(), Invalid> {
        self.check_url()?;
        self.check_token()?;
        self.check_tls()?;
        self.check_batches()?;
        self.check_upload_rate()?;
        self.check_requests()
    }

    /// `relay.url`: http or https, with a host.
    fn check_url(&self) -> Result<(), Invalid> {
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(u) => {
                return Err((
                    "relay.url",
                    format!(
                        "{:?} must be an http:// or https:// URL with a host (got scheme {:?})",
                        self.url,
                        u.scheme()
                    ),
                ));
            }
            Err(e) => return Err(("relay.url", format!("{:?} is not a URL: {e}", self.url))),
        }
        Ok(())
    }

    /// `relay.token` (or `token_file`): one of them, usable in a header, not the placeholder.
    fn check_token(&self) -> Result<(), Invalid> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err((
                    "relay.token",
                    "set either token or token_file, not both".into(),
                ));
            }
            (Some(t), None) if t.trim().is_empty() => {
                return Err(("relay.token", "is empty".into()));
            }
            (Some(t), None) if t.trim() == PLACEHOLDER_TOKEN => {
                return Err((
                    "relay.token",
                    format!(
                        "is still the placeholder {PLACEHOLDER_TOKEN:?} of the default configuration; \
                         set the token the relay's operator issued for this gateway (or use token_file)"
                    ),
                ));
            }
            (Some(t), None) => {
                // It goes into an HTTP header: one that cannot would fail every request.
                pigeon_shared::wire::check_bearer_token(t.trim())
                    .map_err(|e| ("relay.token", e))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// `relay.client_cert`, `client_key` and `ca_file`: together, and only over https.
    fn check_tls(&self) -> Result<(), Invalid> {
        let https = self.url.starts_with("https:");
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => {
                return Err((
                    "relay.client_key",
                    "is missing: client_cert needs its key".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "relay.client_cert",
                    "is missing: client_key needs its certificate".into(),
                ));
            }
            (Some(_), Some(_)) if !https => {
                return Err((
                    "relay.client_cert",
                    "is only presented over TLS: relay.url must be https://".into(),
                ));
            }
            _ => {}
        }
        if self.ca_file.is_some() && !https {
            return Err((
                "relay.ca_file",
                "is only used over TLS: relay.url must be https://".into(),
            ));
        }
        Ok(())
    }

    /// `relay.batch_max_events`, `batch_max_bytes` and `batch_linger`.
    fn check_batches(&self) -> Result<(), Invalid> {
        if self.batch_max_events == 0 || self.batch_max_events > 100_000 {
            return Err((
                "relay.batch_max_events",
                "must be between 1 and 100000".into(),
            ));
        }
        if self.batch_max_bytes.get() < 1024 {
            return Err(("relay.batch_max_bytes", "must be at least 1KiB".into()));
        }
        if self.batch_linger.get() > std::time::Duration::from_secs(60) {
            return Err((
                "relay.batch_linger",
                "must be at most 60s (0s sends every event at once)".into(),
            ));
        }
        Ok(())
    }

    /// `relay.upload_schedule` and `relay.max_upload_rate`.
    fn check_upload_rate(&self) -> Result<(), Invalid> {
        for w in &self.upload_schedule {
            for t in [&w.from, &w.to] {
                if minutes_of_day(t).is_none() {
                    return Err((
                        "relay.upload_schedule",
                        format!("{t:?} is not a time of day like \"22:00\""),
                    ));
                }
            }
            if w.from == w.to {
                return Err((
                    "relay.upload_schedule",
                    format!(
                        "from and to are both {:?}; a window needs two different times",
                        w.from
                    ),
                ));
            }
            if w.max_upload_rate.is_some_and(|b| b.get() < 1024) {
                return Err((
                    "relay.upload_schedule.max_upload_rate",
                    "must be at least 1KiB (per second); leave it out for no limit".into(),
                ));
            }
        }
        if self.max_upload_rate.is_some_and(|b| b.get() < 1024) {
            return Err((
                "relay.max_upload_rate",
                "must be at least 1KiB (per second); leave it out for no limit".into(),
            ));
        }
        Ok(())
    }

    /// `relay.max_attempts`, `max_event_bytes`, `max_file_uploads`, `request_timeout`,
    /// `backoff_initial` and `backoff_max`.
    fn check_requests(&self) -> Result<(), Invalid> {
        if self.max_attempts.is_some_and(|n| n < 2) {
            return Err((
                "relay.max_attempts",
                "must be at least 2; leave it out to retry for ever".into(),
            ));
        }
        if self.max_event_bytes.get() < 1024 {
            return Err((
                "relay.max_event_bytes",
                "must be at least 1KiB (the relay's limits.max_event_bytes)".into(),
            ));
        }
        if !(1..=16).contains(&self.max_file_uploads) {
            return Err(("relay.max_file_uploads", "must be between 1 and 16".into()));
        }
        if self.request_timeout.get().is_zero() {
            return Err(("relay.request_timeout", "must be more than 0".into()));
        }
        if self.backoff_initial.get().is_zero() || self.backoff_initial > self.backoff_max {
            return Err((
                "relay.backoff_initial",
                "must be more than 0 and at most relay.backoff_max".into(),
            ));
        }
        Ok(())
    }
}

impl OutboxConfig {
    /// `outbox.commit_max_records` and `outbox.max_bytes`.
    fn validate(&self) -> Result<(), Invalid> {
        if self.commit_max_records == 0 {
            return Err(("outbox.commit_max_records", "must be at least 1".into()));
        }
        if self
            .max_bytes
            .is_some_and(|b| b.get() < ByteSize::mib(16).get())
        {
            return Err((
                "outbox.max_bytes",
                "must be at least 16MiB (the write-ahead log alone may take that)".into(),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in error messages.
    pub(crate) fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks what the types alone cannot, naming the key at fault.
    fn validate(&self) -> Result<(), Invalid> {
        self.relay.validate()?;
        self.outbox.validate()?;
        if let Some(mqtt) = &self.mqtt {
            mqtt.validate()?;
            mqtt.check_relay_limit(&self.gateway.id.source("mqtt"), self.relay.max_event_bytes)?;
        }
        if let Some(files) = &self.files {
            files.validate()?;
        }
        self.health.validate()?;
        self.http.listen_addr().map_err(|m| ("http.listen", m))?;
        self.checked_rules().map_err(|m| ("rules", m))?;
        Ok(())
    }

    /// The `[[rules]]`, checked: the first that cannot run is named with what is wrong
    /// (a CESQL syntax error with its column), as is a name given twice.
    pub(crate) fn checked_rules(&self) -> Result<Vec<pigeon_rules::Rule>, String> {
        let mut seen = std::collections::HashSet::new();
        self.rules
            .iter()
            .map(|r| {
                if !seen.insert(r.name.as_str()) {
                    return Err(format!("rule {:?}: the name is given twice", r.name));
                }
                r.check().map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Where picked-up files wait for upload (also when `[files]` was removed since: dead
    /// letters may still refer to files there).
    pub(crate) fn spool_dir(&self) -> PathBuf {
        match &self.files {
            Some(f) => f.spool_dir(&self.gateway.data_dir),
            None => self.gateway.data_dir.join("spool"),
        }
    }

    /// The relay token, read from `token` or `token_file`. `None` when neither is set.
    pub(crate) fn relay_token(&self) -> Result<Option<String>, String> {
        match (&self.relay.token, &self.relay.token_file) {
            (Some(t), _) => Ok(Some(t.trim().to_owned())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("relay.token_file: cannot read {}: {e}", path.display())
                })?;
                let token = text.lines().next().unwrap_or("").trim().to_owned();
                if token.is_empty() {
                    return Err(format!("relay.token_file: {} is empty", path.display()));
                }
                pigeon_shared::wire::check_bearer_token(&token).map_err(|e| {
                    format!("relay.token_file: the token in {} {e}", path.display())
                })?;
                Ok(Some(token))
            }
            (None, None) => Ok(None),
        }
    }
}

/// The token the default configuration ships with; refused, so that a gateway installed
/// and started without editing its config stops with a clear message instead of being
/// refused by the relay forever.
pub(crate) const PLACEHOLDER_TOKEN: &str = "change-me";

/// The commented default configuration, as printed by `print-default-config`.
pub(crate) const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("gateway.toml")).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"
        [gateway]
        id = "pi-1"
        [relay]
        url = "http://127.0.0.1:8080"
        token = "secret"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.gateway.id.as_str(), "pi-1");
        assert_eq!(c.gateway.data_dir, PathBuf::from("/var/lib/pigeon"));
        assert_eq!(c.relay.batch_max_events, 1000);
        assert_eq!(
            c.relay.batch_linger.get(),
            std::time::Duration::from_secs(1)
        );
        assert_eq!(c.outbox.synchronous, Synchronous::Full);
        assert!(c.mqtt.is_none());
        assert_eq!(c.relay_token().unwrap().as_deref(), Some("secret"));
        assert!(c.health.enabled);
        assert_eq!(c.health.interval.get().as_secs(), 60);
        assert!(c.http.enabled);
        assert_eq!(
            c.http.listen_addr().unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
    }

    #[test]
    fn default_config_file_parses_once_its_token_is_set() {
        let e = parse(DEFAULT_CONFIG).unwrap_err();
        assert!(
            e.contains("relay.token") && e.contains("placeholder"),
            "{e}"
        );
        let c = parse(&DEFAULT_CONFIG.replace("\"change-me\"", "\"issued\"")).unwrap();
        let mqtt = c.mqtt.expect("the default config shows an MQTT source");
        assert!(!mqtt.subscriptions.is_empty());
    }

    #[test]
    fn the_default_configs_commented_upload_limits_work_when_uncommented() {
        let text: String = DEFAULT_CONFIG
            .replace("\"change-me\"", "\"issued\"")
            .lines()
            .map(|l| {
                let bare = l.strip_prefix("# ").unwrap_or(l);
                let keep = [
                    "max_upload_rate =",
                    "[[relay.upload_schedule]]",
                    "from =",
                    "to =",
                ];
                if keep.iter().any(|k| bare.starts_with(k)) {
                    bare
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&text).unwrap();
        assert_eq!(c.relay.upload_rate_at(12 * 60), Some(64 * 1024));
        assert_eq!(c.relay.upload_rate_at(23 * 60), None);
    }

    #[test]
    fn the_default_configs_commented_files_section_works_when_uncommented() {
        let start = DEFAULT_CONFIG
            .find("# [files]")
            .expect("a commented [files] section");
        let block: String = DEFAULT_CONFIG[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let text = format!(
            "{}\n{block}",
            DEFAULT_CONFIG[..start].replace("\"change-me\"", "\"issued\"")
        );
        let c = parse(&text).unwrap();
        let files = c.files.as_ref().expect("[files] parses");
        assert_eq!(files.watch[0].name, "cameras");
        assert!(
            files.watch[0].rules.is_empty(),
            "the example rule stays commented"
        );
        assert_eq!(c.spool_dir(), PathBuf::from("/srv/pigeon/spool"));
    }

    #[test]
    fn the_default_configs_commented_budget_and_alarm_route_work_when_uncommented() {
        let uncomment = |l: &str| -> bool {
            let bare = l.strip_prefix("# ").unwrap_or(l);
            [
                "max_bytes =",
                "min_free =",
                "filter = \"sensors/+/alarms/#\"",
                "priority =",
                "when_full =",
            ]
            .iter()
            .any(|k| bare.starts_with(k))
        };
        let mut out = Vec::new();
        let mut lines = DEFAULT_CONFIG.lines().peekable();
        while let Some(l) = lines.next() {
            // The alarm block: its header is the line before its filter.
            if l == "# [[mqtt.subscriptions]]"
                && lines
                    .peek()
                    .is_some_and(|n| n.contains("sensors/+/alarms/#"))
            {
                out.push("[[mqtt.subscriptions]]".to_owned());
                continue;
            }
            if l == "# type = \"io.pigeon.sensor.alarm\"" {
                out.push(l[2..].to_owned());
                continue;
            }
            out.push(if uncomment(l) {
                l[2..].to_owned()
            } else {
                l.to_owned()
            });
        }
        let c = parse(&out.join("\n").replace("\"change-me\"", "\"issued\"")).unwrap();
        assert_eq!(c.outbox.max_bytes.map(|b| b.get()), Some(8 << 30));
        assert_eq!(c.outbox.min_free.map(|b| b.get()), Some(500 << 20));
        let mqtt = c.mqtt.unwrap();
        let alarm = mqtt
            .subscription_for("sensors/kitchen/alarms/smoke")
            .unwrap();
        assert_eq!(alarm.event_type, "io.pigeon.sensor.alarm");
        assert_eq!(alarm.policy().priority, 9);
        assert_eq!(alarm.policy().when_full, crate::outbox::WhenFull::Refuse);
        let reading = mqtt.subscription_for("sensors/kitchen/climate").unwrap();
        assert_eq!(reading.policy(), crate::outbox::Policy::default());
    }

    #[test]
    fn upload_schedule_picks_the_window_of_the_hour() {
        let c = parse(&format!(
            r#"{MINIMAL}
            max_upload_rate = "64KiB"
            [[relay.upload_schedule]]
            from = "22:00"
            to = "06:30"
            [[relay.upload_schedule]]
            from = "12:00"
            to = "13:00"
            max_upload_rate = "1MiB"
            "#
        ))
        .unwrap();
        let at = |h: u32, m: u32| c.relay.upload_rate_at(h * 60 + m);
        assert_eq!(
            at(21, 59),
            Some(64 * 1024),
            "outside any window: the default limit"
        );
        assert_eq!(at(22, 0), None, "night: no limit");
        assert_eq!(at(3, 0), None, "across midnight");
        assert_eq!(at(6, 29), None);
        assert_eq!(at(6, 30), Some(64 * 1024), "`to` is exclusive");
        assert_eq!(at(12, 15), Some(1024 * 1024));
        for (bad, what) in [
            ("from = \"25:00\"\nto = \"06:00\"", "not a time of day"),
            ("from = \"7:00\"\nto = \"08:00\"", "not a time of day"),
            ("from = \"06:00\"\nto = \"06:00\"", "two different times"),
        ] {
            let e = parse(&format!("{MINIMAL}\n[[relay.upload_schedule]]\n{bad}\n")).unwrap_err();
            assert!(
                e.contains("relay.upload_schedule") && e.contains(what),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&format!("{MINIMAL}\nbatch_max_event = 3\n")).unwrap_err();
        assert!(e.contains("batch_max_event"), "{e}");
        let e = parse(&MINIMAL.replace("token =", "tokn =")).unwrap_err();
        assert!(e.contains("tokn"), "{e}");
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let e = parse(&MINIMAL.replace("\"pi-1\"", "\"pi 1\"")).unwrap_err();
        assert!(e.contains("invalid gateway id"), "{e}");
        let e = parse(&MINIMAL.replace("http://127.0.0.1:8080", "127.0.0.1:8080")).unwrap_err();
        assert!(e.contains("relay.url"), "{e}");
        let e = parse(&MINIMAL.replace("http://", "ftp://")).unwrap_err();
        assert!(e.contains("relay.url"), "{e}");
        let e = parse(&format!("{MINIMAL}\nrequest_timeout = \"soon\"\n")).unwrap_err();
        assert!(e.contains("is not a duration"), "{e}");
        let e = parse(&format!("{MINIMAL}\nbatch_max_events = 0\n")).unwrap_err();
        assert!(e.contains("relay.batch_max_events"), "{e}");
        let e = parse(&format!("{MINIMAL}\nbatch_linger = \"2m\"\n")).unwrap_err();
        assert!(
            e.contains("relay.batch_linger") && e.contains("at most 60s"),
            "{e}"
        );
        let c = parse(&format!("{MINIMAL}\nbatch_linger = \"0s\"\n")).unwrap();
        assert!(c.relay.batch_linger.get().is_zero());
        let e = parse(&format!("{MINIMAL}\ntoken_file = \"/x\"\n")).unwrap_err();
        assert!(e.contains("not both"), "{e}");
    }

    /// MINIMAL with `relay` added to [relay], and an [mqtt] section with `mqtt` and a
    /// subscription of type `event_type`.
    fn with_mqtt(relay: &str, mqtt: &str, event_type: &str) -> String {
        format!(
            "{MINIMAL}{relay}\n[mqtt]\n{mqtt}\n[[mqtt.subscriptions]]\nfilter = \"sensors/#\"\ntype = {event_type:?}\n"
        )
    }

    /// Issue 24: the gateway took MQTT messages of up to 1 MiB while the relay refused
    /// events over 1 MiB of JSON, so binary payloads over about 768 KiB were acknowledged
    /// to the broker and then dead-lettered.
    #[test]
    fn issue_24_mqtt_max_packet_size_must_fit_relay_max_event_bytes() {
        let reading = "io.pigeon.sensor.reading";
        let check = |relay: &str, mqtt: &str| parse(&with_mqtt(relay, mqtt, reading));
        // The defaults agree: a 1 MiB message's event (base64: 1.33 MiB) fits 2 MiB.
        let c = check("", "").unwrap();
        assert_eq!(c.relay.max_event_bytes.get(), 2 << 20);
        assert_eq!(c.mqtt.as_ref().unwrap().max_packet_size.get(), 1 << 20);

        // The relay's old default does not take what the gateway lets through.
        let e = check("max_event_bytes = \"1MiB\"", "").unwrap_err();
        assert!(
            e.contains("mqtt.max_packet_size: (1MiB) lets through"),
            "{e}"
        );
        assert!(e.contains("over relay.max_event_bytes (1MiB)"), "{e}");
        assert!(e.contains("at most 767KiB"), "{e}");
        assert!(e.contains("limits.max_event_bytes"), "{e}");

        let e = check("", "max_packet_size = \"3MiB\"").unwrap_err();
        assert!(e.contains("(3MiB) lets through"), "{e}");
        assert!(e.contains("(4.0 MiB)"), "{e}");
        assert!(e.contains("over relay.max_event_bytes (2MiB)"), "{e}");
        assert!(e.contains("at most 1535KiB"), "{e}");
        // The suggested figure passes; one KiB more does not.
        check("", "max_packet_size = \"1535KiB\"").unwrap();
        check("", "max_packet_size = \"1536KiB\"").unwrap_err();
        // Raising both works.
        check("max_event_bytes = \"5MiB\"", "max_packet_size = \"3MiB\"").unwrap();

        // The longest event type counts: it is in every event of its route.
        let long_type = "t".repeat(800 << 10);
        let Err(e) = parse(&with_mqtt("", "", &long_type)) else {
            panic!("an 800 KiB type and a 1 MiB packet fit 2 MiB");
        };
        assert!(e.contains("mqtt.max_packet_size"), "{e}");

        // Without [mqtt], only its floor.
        parse(&format!("{MINIMAL}max_event_bytes = \"1KiB\"\n")).unwrap();
        let e = parse(&format!("{MINIMAL}max_event_bytes = \"1000\"\n")).unwrap_err();
        assert!(e.contains("relay.max_event_bytes"), "{e}");
        let e = check("max_event_bytes = \"1KiB\"", "").unwrap_err();
        assert!(e.contains("mqtt.max_packet_size"), "{e}");
        let e = parse(&with_mqtt("max_event_bytes = \"1KiB\"", "", &long_type)).unwrap_err();
        assert!(
            e.contains(
                "relay.max_event_bytes: (1KiB) is less than the event of an empty MQTT message"
            ),
            "{e}"
        );
    }

    #[test]
    fn health_and_http_sections() {
        let c = parse(&format!(
            "{MINIMAL}\n[health]\nenabled = false\ninterval = \"5m\"\n[http]\nenabled = false\nlisten = \"0.0.0.0:80\"\n"
        ))
        .unwrap();
        assert!(!c.health.enabled && !c.http.enabled);
        assert_eq!(c.health.interval.get().as_secs(), 300);
        let e = parse(&format!("{MINIMAL}\n[health]\ninterval = \"100ms\"\n")).unwrap_err();
        assert!(e.contains("health.interval"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[health]\nintervall = \"1m\"\n")).unwrap_err();
        assert!(e.contains("intervall"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[http]\nlisten = \"localhost\"\n")).unwrap_err();
        assert!(e.contains("http.listen"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[http]\nport = 9464\n")).unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    /// Issue 24.4: a token that cannot travel in the Authorization header is refused by
    /// check-config, naming relay.token (it used to fail every request at run time).
    #[test]
    fn issue_24_tokens_that_cannot_be_sent_are_refused_up_front() {
        for (token, problem) in [
            ("sec\\nret", "a line break at character 4"),
            ("sécret", "the non-ASCII character 'é' at character 2"),
            ("sec ret", "white space at character 4"),
            ("sec\\u0007ret", "the control character"),
        ] {
            let text = MINIMAL.replace("token = \"secret\"", &format!("token = \"{token}\""));
            let e = parse(&text).unwrap_err();
            assert!(
                e.contains("relay.token") && e.contains(problem),
                "{token}: {e}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3crét\n").unwrap();
        let text = MINIMAL.replace("token = \"secret\"", &format!("token_file = {:?}", path));
        let e = parse(&text).unwrap().relay_token().unwrap_err();
        assert!(
            e.starts_with("relay.token_file: the token in") && e.contains("non-ASCII"),
            "{e}"
        );
    }

    #[test]
    fn token_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret \n").unwrap();
        let text = MINIMAL.replace("token = \"secret\"", &format!("token_file = {:?}", path));
        let c = parse(&text).unwrap();
        assert_eq!(c.relay_token().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(c.relay_token().unwrap_err().contains("is empty"));
        std::fs::remove_file(&path).unwrap();
        assert!(c.relay_token().unwrap_err().contains("cannot read"));
    }
}
