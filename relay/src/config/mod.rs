//! The relay's configuration file: serde structs that mirror the TOML, and
//! [`RelayConfig::validate`] into the checked [`Config`] the rest of the relay uses.
//!
//! Every key is documented in `docs/configuration-relay.md`; [`DEFAULT_CONFIG`] is the
//! commented file `pigeon-relay print-default-config` prints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pigeon_shared::ce::GatewayId;
use pigeon_shared::units::{ByteSize, Duration};
use serde::Deserialize;

use crate::auth::{Credential, TokenDigest};

/// The commented default configuration; it parses to [`RelayConfig::default`].
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// The configuration file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub allow_unauthenticated: bool,
    pub shutdown_timeout: Duration,
    pub limits: LimitsConfig,
    pub sink: SinkConfig,
    pub stream: StreamConfig,
    pub objects: ObjectsConfig,
    pub capture: CaptureConfig,
    pub uploads: UploadsConfig,
    pub tls: TlsConfig,
    pub gateways: Vec<GatewayConfig>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./pigeon-relay-data"),
            allow_unauthenticated: false,
            shutdown_timeout: Duration::from_secs(10),
            limits: LimitsConfig::default(),
            sink: SinkConfig::default(),
            stream: StreamConfig::default(),
            objects: ObjectsConfig::default(),
            capture: CaptureConfig::default(),
            uploads: UploadsConfig::default(),
            tls: TlsConfig::default(),
            gateways: Vec::new(),
        }
    }
}

/// `[limits]`: request size and concurrency limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_request_bytes: ByteSize,
    pub max_decompressed_bytes: ByteSize,
    pub max_event_bytes: ByteSize,
    pub max_events_per_request: usize,
    pub max_concurrent_requests: usize,
    pub max_object_bytes: ByteSize,
    pub max_concurrent_uploads: usize,
    pub max_requests_per_gateway: usize,
    pub max_buffered_bytes_per_gateway: ByteSize,
    pub max_buffered_bytes: ByteSize,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
    pub header_timeout: Duration,
    pub max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: ByteSize::mib(16),
            max_decompressed_bytes: ByteSize::mib(64),
            // Room for the event of any message pigeon-gateway takes by default (its
            // mqtt.max_packet_size, 1 MiB, is 1.33 MiB in base64); its
            // relay.max_event_bytes defaults to this (issue 24).
            max_event_bytes: ByteSize::mib(2),
            max_events_per_request: 100_000,
            max_concurrent_requests: 256,
            max_object_bytes: ByteSize::mib(4 * 1024),
            max_concurrent_uploads: 64,
            // A pigeon-gateway has one batch and one upload in flight at a time.
            max_requests_per_gateway: 8,
            // Two full batches.
            max_buffered_bytes_per_gateway: ByteSize::mib(32),
            max_buffered_bytes: ByteSize::mib(512),
            body_idle_timeout: Duration::from_secs(15),
            // Twice the gateway's relay.request_timeout.
            body_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(30),
            // Far above what a fleet keeps open (one or two per gateway at a time, closed
            // after header_timeout idle), well below the unit's LimitNOFILE (65536).
            max_connections: 16_384,
        }
    }
}

/// `[sink]`: the embedded stream sink's writer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    pub checkpoint_interval: Duration,
    pub queue_depth: usize,
    pub retry_after: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
            queue_depth: 1024,
            retry_after: Duration::from_secs(5),
        }
    }
}

/// `[stream]`: where accepted events go.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub kind: StreamKind,
    pub kafka: KafkaConfig,
}

/// `stream.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// `.jsonl` files under the data dir.
    #[default]
    Files,
    /// A Kafka-protocol broker.
    Kafka,
}

/// `[stream.kafka]`: the Kafka stream.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub client_id: String,
    pub idempotence: bool,
    pub delivery_timeout: Duration,
    pub recovery_window: Duration,
    pub recovery_timeout: Duration,
    pub security_protocol: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub ssl_ca_location: Option<PathBuf>,
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topic: "pigeon.{tenant}".to_owned(),
            client_id: "pigeon-relay".to_owned(),
            idempotence: true,
            delivery_timeout: Duration::from_secs(10),
            recovery_window: Duration::from_secs(86_400),
            recovery_timeout: Duration::from_secs(300),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            properties: BTreeMap::new(),
        }
    }
}

/// librdkafka properties the relay sets itself; `stream.kafka.properties` may not.
const KAFKA_OWN_PROPERTIES: [&str; 8] = [
    "bootstrap.servers",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "group.id",
    "enable.auto.commit",
];

/// `[objects]`: where uploaded files are stored, and how events point at them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectsConfig {
    pub kind: ObjectsKind,
    /// The prefix of every `dataref`; absent: `file://` and the absolute path of
    /// `<data_dir>/objects/`, or `s3://<bucket>/<prefix>objects/`.
    pub base_url: Option<String>,
    pub s3: S3Config,
}

/// `objects.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectsKind {
    /// Files under `<data_dir>/objects/`.
    #[default]
    Files,
    /// An S3 bucket (AWS or S3-compatible).
    S3,
}

/// `[objects.s3]`: the bucket uploaded files go to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// Absent: the SDK's chain (`AWS_REGION`, the profile, instance metadata).
    pub region: Option<String>,
    /// Absent: AWS's own endpoint for the region.
    pub endpoint: Option<String>,
    pub path_style: bool,
    /// Prepended to every key, e.g. `"pigeon/"`.
    pub prefix: String,
    /// Both or neither; absent: the SDK's credential chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub part_size: ByteSize,
    pub timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            region: None,
            endpoint: None,
            path_style: false,
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            part_size: ByteSize::mib(8),
            timeout: Duration::from_secs(60),
        }
    }
}

/// `[capture]`: every event also into the bucket, Hive-partitioned and compressed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    pub enabled: bool,
    pub roll_bytes: ByteSize,
    pub roll_age: Duration,
    pub group: String,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            roll_bytes: ByteSize::mib(16),
            roll_age: Duration::from_secs(300),
            group: "pigeon-relay-capture".to_owned(),
        }
    }
}

/// `[tls]`: HTTPS on `listen`, optionally with client certificates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub reload_check: Duration,
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            client_ca: None,
            client_auth: ClientAuth::Optional,
            reload_check: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// `tls.client_auth`: whether a connection must present a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A certificate identifies its gateway; without one, a bearer token does.
    Optional,
    /// No certificate, no connection.
    Required,
}

impl TlsConfig {
    fn validate(&self) -> Result<Option<crate::tls::TlsSettings>, ConfigError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(invalid(
                        "tls.client_ca",
                        "needs tls.cert and tls.key: client certificates are only asked for over HTTPS",
                    ));
                }
                return Ok(None);
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key",
                    "is missing: tls.cert needs its private key",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert",
                    "is missing: tls.key needs its certificate",
                ));
            }
            (Some(c), Some(k)) => (c, k),
        };
        if self.client_auth == ClientAuth::Required && self.client_ca.is_none() {
            return Err(invalid(
                "tls.client_auth",
                "= \"required\" needs tls.client_ca, the CA that signs the gateways' certificates",
            ));
        }
        if self.reload_check.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("tls.reload_check", "must be at least 1s"));
        }
        if self.handshake_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("tls.handshake_timeout", "must be at least 1s"));
        }
        Ok(Some(crate::tls::TlsSettings {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.client_ca.clone(),
            client_auth_required: self.client_auth == ClientAuth::Required,
            reload_check: self.reload_check.get(),
            handshake_timeout: self.handshake_timeout.get(),
        }))
    }
}

/// `[uploads]`: the resumable upload endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadsConfig {
    pub abandon_after: Duration,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        Self {
            abandon_after: Duration::from_secs(7 * 86_400),
        }
    }
}

/// `[[gateways]]`: one gateway allowed to send, with its bearer token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub id: GatewayId,
    /// The tenant the gateway belongs to; absent: [`DEFAULT_TENANT`].
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub allow_unauthenticated: bool,
    pub shutdown_timeout: std::time::Duration,
    pub limits: Limits,
    pub sink: SinkSettings,
    pub stream: StreamSettings,
    pub objects: ObjectSettings,
    /// `None`: capture is off.
    pub capture: Option<CaptureSettings>,
    pub uploads: UploadSettings,
    /// `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
    pub gateways: Vec<Credential>,
    /// Each configured gateway's tenant.
    pub tenants: HashMap<GatewayId, String>,
}

/// The tenant of gateways that name none, and of every event in unauthenticated mode.
pub const DEFAULT_TENANT: &str = "default";

/// Checked `[stream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSettings {
    Files,
    Kafka(KafkaSettings),
}

/// Checked `[stream.kafka]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: crate::sink::stream::kafka::binding::TopicTemplate,
    /// Set on the producer and the read-back consumer: client.id, security, and
    /// `properties`, in that order.
    pub client_properties: Vec<(String, String)>,
    pub idempotence: bool,
    pub delivery_timeout: std::time::Duration,
    pub recovery_window: std::time::Duration,
    pub recovery_timeout: std::time::Duration,
    /// The producer's `message.max.bytes`: room for the largest event and its headers.
    pub max_message_bytes: u64,
}

/// Checked `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: u64,
    pub max_decompressed_bytes: u64,
    pub max_event_bytes: u64,
    pub max_events_per_request: usize,
    pub max_concurrent_requests: usize,
    pub max_object_bytes: u64,
    pub max_concurrent_uploads: usize,
    pub max_requests_per_gateway: usize,
    pub max_buffered_bytes_per_gateway: u64,
    pub max_buffered_bytes: u64,
    /// A request body that sends nothing for this long is answered 408.
    pub body_idle_timeout: std::time::Duration,
    /// A request body (other than an upload `PATCH`'s) not complete after this long is
    /// answered 408.
    pub body_timeout: std::time::Duration,
    /// A connection whose next request's headers are not complete this long after it
    /// began waiting for them is closed (also an idle kept-alive one).
    pub header_timeout: std::time::Duration,
    /// Client connections open at once; the next waits in the listen queue.
    pub max_connections: usize,
}

/// Checked `[capture]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSettings {
    /// A roll is written once it has this many bytes of events (uncompressed).
    pub roll_bytes: u64,
    /// … or once its first event waited this long.
    pub roll_age: std::time::Duration,
    /// With Kafka: the consumer group the relays capture with.
    pub group: String,
}

/// Checked `[sink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkSettings {
    pub checkpoint_interval: std::time::Duration,
    pub queue_depth: usize,
    pub retry_after: std::time::Duration,
}

/// Checked `[objects]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSettings {
    /// Ends with `/`; the object key follows it.
    pub base_url: String,
    /// `None`: files under `<data_dir>/objects/`.
    pub s3: Option<S3Settings>,
}

/// Checked `[objects.s3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub path_style: bool,
    /// Empty or ending in `/`.
    pub prefix: String,
    /// (access key id, secret access key).
    pub static_keys: Option<(String, String)>,
    /// A multiple of 1 MiB, 5 MiB to 5 GiB.
    pub part_size: u64,
    pub timeout: std::time::Duration,
}

/// S3's smallest part (but the last) and largest part.
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's most parts in one upload.
pub const MAX_PARTS: u64 = 10_000;

/// Checked `[uploads]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadSettings {
    pub abandon_after: std::time::Duration,
}

/// The shortest `uploads.abandon_after`.
pub const MIN_ABANDON_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The most a concurrency limit may allow (tokio's semaphore has a hard upper bound on
/// permits).
const MAX_PERMITS: usize = 1_000_000;

/// A `file://` URL for an absolute path: bytes other than `A-Z a-z 0-9 - . _ ~ /` are
/// percent-encoded, so a data dir with spaces still gives a valid URL.
pub fn file_url(path: &Path) -> String {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt;
    let mut url = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            url.push(b as char);
        } else {
            let _ = write!(url, "%{b:02X}");
        }
    }
    url
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl RelayConfig {
    /// Reads and parses a config file (not yet validated).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text (not yet validated).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks values that the types alone do not, and builds the [`Config`].
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let l = &self.limits;
        if l.max_request_bytes.get() == 0 {
            return Err(invalid("limits.max_request_bytes", "must be more than 0"));
        }
        if l.max_decompressed_bytes.get() == 0 {
            return Err(invalid(
                "limits.max_decompressed_bytes",
                "must be more than 0",
            ));
        }
        if l.max_event_bytes.get() == 0 {
            return Err(invalid("limits.max_event_bytes", "must be more than 0"));
        }
        if l.max_event_bytes > l.max_decompressed_bytes {
            return Err(invalid(
                "limits.max_event_bytes",
                format!(
                    "({}) must not be more than limits.max_decompressed_bytes ({})",
                    l.max_event_bytes, l.max_decompressed_bytes
                ),
            ));
        }
        if l.max_events_per_request == 0 {
            return Err(invalid(
                "limits.max_events_per_request",
                "must be at least 1",
            ));
        }
        if l.max_concurrent_requests == 0 {
            return Err(invalid(
                "limits.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        if l.max_concurrent_requests > MAX_PERMITS {
            return Err(invalid(
                "limits.max_concurrent_requests",
                format!("must be at most {MAX_PERMITS}"),
            ));
        }
        if l.max_object_bytes.get() == 0 {
            return Err(invalid("limits.max_object_bytes", "must be more than 0"));
        }
        if !(1..=MAX_PERMITS).contains(&l.max_concurrent_uploads) {
            return Err(invalid(
                "limits.max_concurrent_uploads",
                format!("must be from 1 to {MAX_PERMITS}"),
            ));
        }
        if !(1..=MAX_PERMITS).contains(&l.max_requests_per_gateway) {
            return Err(invalid(
                "limits.max_requests_per_gateway",
                format!("must be from 1 to {MAX_PERMITS}"),
            ));
        }
        // A gateway must be able to send its largest request, and its largest upload's
        // create (its event and the CreateUpload around it).
        let largest_body = l
            .max_request_bytes
            .get()
            .max(l.max_event_bytes.get() + crate::upload::routes::CREATE_OVERHEAD);
        if l.max_buffered_bytes_per_gateway.get() < largest_body {
            return Err(invalid(
                "limits.max_buffered_bytes_per_gateway",
                format!(
                    "({}) must be at least the largest request body a gateway may send ({}: limits.max_request_bytes, or limits.max_event_bytes and an upload's envelope)",
                    l.max_buffered_bytes_per_gateway,
                    ByteSize(largest_body)
                ),
            ));
        }
        if l.max_buffered_bytes < l.max_buffered_bytes_per_gateway {
            return Err(invalid(
                "limits.max_buffered_bytes",
                format!(
                    "({}) must be at least limits.max_buffered_bytes_per_gateway ({})",
                    l.max_buffered_bytes, l.max_buffered_bytes_per_gateway
                ),
            ));
        }
        if l.body_idle_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("limits.body_idle_timeout", "must be at least 1s"));
        }
        if l.header_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("limits.header_timeout", "must be at least 1s"));
        }
        if l.max_connections < l.max_concurrent_requests {
            return Err(invalid(
                "limits.max_connections",
                format!(
                    "({}) must be at least limits.max_concurrent_requests ({}): every request needs a connection",
                    l.max_connections, l.max_concurrent_requests
                ),
            ));
        }
        if l.max_connections > MAX_PERMITS {
            return Err(invalid(
                "limits.max_connections",
                format!("must be at most {MAX_PERMITS}"),
            ));
        }
        if l.body_timeout.get() < l.body_idle_timeout.get() {
            return Err(invalid(
                "limits.body_timeout",
                format!(
                    "({}) must be at least limits.body_idle_timeout ({})",
                    l.body_timeout, l.body_idle_timeout
                ),
            ));
        }
        if self.uploads.abandon_after.get() < MIN_ABANDON_AFTER {
            return Err(invalid("uploads.abandon_after", "must be at least 1m"));
        }
        let s = &self.sink;
        if s.checkpoint_interval.get() < std::time::Duration::from_millis(10) {
            return Err(invalid("sink.checkpoint_interval", "must be at least 10ms"));
        }
        if s.queue_depth == 0 {
            return Err(invalid("sink.queue_depth", "must be at least 1"));
        }
        if s.retry_after.get().as_secs() == 0 {
            return Err(invalid(
                "sink.retry_after",
                "must be at least 1s (Retry-After is in whole seconds)",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        // Absolute, so the default `dataref`s name the objects wherever they are read.
        let data_dir = std::path::absolute(&self.data_dir).map_err(|e| {
            invalid(
                "data_dir",
                format!("cannot be made absolute (the current directory is unusable: {e})"),
            )
        })?;
        let s3 = self.objects.validate_s3(l.max_object_bytes.get())?;
        let base_url = match &self.objects.base_url {
            None => match &s3 {
                None => format!(
                    "{}/",
                    file_url(&data_dir.join(crate::data_dir::OBJECTS_DIR))
                ),
                Some(s) => format!("s3://{}/{}{}/", s.bucket, s.prefix, OBJECTS_PREFIX),
            },
            Some(url) => {
                if !url.ends_with('/') {
                    return Err(invalid(
                        "objects.base_url",
                        format!("({url:?}) must end with \"/\": the object key is appended to it"),
                    ));
                }
                if !url.contains(':') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(invalid(
                        "objects.base_url",
                        format!(
                            "({url:?}) must be a URL such as \"s3://bucket/prefix/\", without spaces"
                        ),
                    ));
                }
                url.clone()
            }
        };

        let tls = self.tls.validate()?;
        let certificates = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        let mut gateways = Vec::with_capacity(self.gateways.len());
        let mut tenants = HashMap::with_capacity(self.gateways.len());
        for (i, g) in self.gateways.iter().enumerate() {
            let key = |field: &str| format!("gateways[{i}].{field}");
            if !ids.insert(g.id.clone()) {
                return Err(invalid(
                    key("id"),
                    format!("{:?} is configured more than once", g.id.as_str()),
                ));
            }
            let digest = match (&g.token, &g.token_sha256) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("token"),
                        "and token_sha256 are both set: give exactly one",
                    ));
                }
                // Identified by its client certificate alone.
                (None, None) if certificates => None,
                (None, None) => {
                    return Err(invalid(
                        key("token"),
                        format!(
                            "is missing for gateway {}: set token or token_sha256 (or tls.client_ca, to identify gateways by their client certificates)",
                            g.id
                        ),
                    ));
                }
                (Some(t), None) => {
                    if t.is_empty() {
                        return Err(invalid(key("token"), "must not be empty"));
                    }
                    // A token no Authorization header can carry would never match.
                    pigeon_shared::wire::check_bearer_token(t)
                        .map_err(|e| invalid(key("token"), e))?;
                    if t.len() < 16 {
                        tracing::warn!(
                            gateway = %g.id,
                            length = t.len(),
                            "The gateway's token is shorter than 16 characters; use a long random secret."
                        );
                    }
                    Some(TokenDigest::of_token(t))
                }
                (None, Some(hex)) => Some(TokenDigest::from_hex(hex).ok_or_else(|| {
                    invalid(
                        key("token_sha256"),
                        "must be 64 hexadecimal digits (a SHA-256 digest)",
                    )
                })?),
            };
            if digest.is_some_and(|d| !digests.insert(d)) {
                return Err(invalid(
                    key("token"),
                    format!("of gateway {} is the same as another gateway's", g.id),
                ));
            }
            gateways.push(Credential {
                gateway: g.id.clone(),
                digest,
            });
            let tenant = match &g.tenant {
                None => DEFAULT_TENANT.to_owned(),
                Some(t) => {
                    check_tenant(t).map_err(|p| invalid(key("tenant"), p))?;
                    t.clone()
                }
            };
            tenants.insert(g.id.clone(), tenant);
        }
        let stream = self.stream.validate(l.max_event_bytes.get())?;
        let capture = self.capture.validate(s3.is_some())?;

        Ok(Config {
            listen: self.listen,
            data_dir,
            allow_unauthenticated: self.allow_unauthenticated,
            shutdown_timeout: self.shutdown_timeout.get(),
            limits: Limits {
                max_request_bytes: l.max_request_bytes.get(),
                max_decompressed_bytes: l.max_decompressed_bytes.get(),
                max_event_bytes: l.max_event_bytes.get(),
                max_events_per_request: l.max_events_per_request,
                max_concurrent_requests: l.max_concurrent_requests,
                max_object_bytes: l.max_object_bytes.get(),
                max_concurrent_uploads: l.max_concurrent_uploads,
                max_requests_per_gateway: l.max_requests_per_gateway,
                max_buffered_bytes_per_gateway: l.max_buffered_bytes_per_gateway.get(),
                max_buffered_bytes: l.max_buffered_bytes.get(),
                body_idle_timeout: l.body_idle_timeout.get(),
                body_timeout: l.body_timeout.get(),
                header_timeout: l.header_timeout.get(),
                max_connections: l.max_connections,
            },
            sink: SinkSettings {
                checkpoint_interval: s.checkpoint_interval.get(),
                queue_depth: s.queue_depth,
                retry_after: s.retry_after.get(),
            },
            stream,
            objects: ObjectSettings { base_url, s3 },
            capture,
            uploads: UploadSettings {
                abandon_after: self.uploads.abandon_after.get(),
            },
            tls,
            gateways,
            tenants,
        })
    }
}

/// Tenants name topics and object prefixes: 1 to 64 of `a-z 0-9 - _`, starting with a
/// letter or digit.
pub fn check_tenant(t: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && t.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "({t:?}) must be 1 to 64 of a-z 0-9 - _, starting with a letter or digit (it names Kafka topics and object prefixes)"
        ))
    }
}

impl CaptureConfig {
    fn validate(&self, s3: bool) -> Result<Option<CaptureSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if !s3 {
            return Err(invalid(
                "capture.enabled",
                "needs objects.kind = \"s3\": capture objects go to that bucket",
            ));
        }
        let g = &self.group;
        if !(1..=200).contains(&g.len())
            || !g
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                "capture.group",
                format!(
                    "({g:?}) must be 1 to 200 of A-Z a-z 0-9 . _ - (it names the Kafka consumer group and a prefix in the bucket)"
                ),
            ));
        }
        let bytes = self.roll_bytes.get();
        if !((64 << 10)..=(256 << 20)).contains(&bytes) {
            return Err(invalid(
                "capture.roll_bytes",
                format!(
                    "({bytes} bytes) must be from 64KiB to 256MiB (a roll is compressed in memory)"
                ),
            ));
        }
        if self.roll_age.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("capture.roll_age", "must be at least 1s"));
        }
        Ok(Some(CaptureSettings {
            roll_bytes: bytes,
            roll_age: self.roll_age.get(),
            group: g.clone(),
        }))
    }
}

/// Where uploaded files go in the bucket, after `objects.s3.prefix`.
pub const OBJECTS_PREFIX: &str = "objects";

impl ObjectsConfig {
    fn validate_s3(&self, max_object_bytes: u64) -> Result<Option<S3Settings>, ConfigError> {
        if self.kind == ObjectsKind::Files {
            return Ok(None);
        }
        let c = &self.s3;
        // Bucket names: 3-63 of a-z 0-9 . - (AWS's rules; S3-compatible servers agree).
        let b = &c.bucket;
        if b.is_empty() {
            return Err(invalid(
                "objects.s3.bucket",
                "must be set when objects.kind = \"s3\"",
            ));
        }
        if b.len() < 3
            || b.len() > 63
            || !b
                .bytes()
                .all(|x| matches!(x, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'))
        {
            return Err(invalid(
                "objects.s3.bucket",
                format!("({b:?}) must be 3 to 63 characters from a-z 0-9 . -"),
            ));
        }
        if let Some(e) = &c.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(invalid(
                "objects.s3.endpoint",
                format!("({e:?}) must be a URL starting with http:// or https://"),
            ));
        }
        let p = &c.prefix;
        if !p.is_empty()
            && (!p.ends_with('/')
                || p.starts_with('/')
                || p.contains("//")
                || p.chars().any(|ch| ch.is_control()))
        {
            return Err(invalid(
                "objects.s3.prefix",
                format!(
                    "({p:?}) must end with \"/\", not start with one, and hold no empty segment or control character"
                ),
            ));
        }
        let static_keys = match (&c.access_key_id, &c.secret_access_key) {
            (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Some((k.clone(), s.clone())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "objects.s3.access_key_id",
                    "and secret_access_key go together: set both (non-empty) or neither",
                ));
            }
        };
        let part = c.part_size.get();
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part) || !part.is_multiple_of(1 << 20) {
            return Err(invalid(
                "objects.s3.part_size",
                format!("({part} bytes) must be a whole number of MiB from 5MiB to 5GiB"),
            ));
        }
        if max_object_bytes.div_ceil(part) > MAX_PARTS {
            return Err(invalid(
                "objects.s3.part_size",
                format!(
                    "({part} bytes) is too small for limits.max_object_bytes ({max_object_bytes}): S3 takes at most {MAX_PARTS} parts"
                ),
            ));
        }
        if c.timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("objects.s3.timeout", "must be at least 1s"));
        }
        Ok(Some(S3Settings {
            bucket: b.clone(),
            region: c.region.clone().filter(|r| !r.is_empty()),
            endpoint: c.endpoint.clone(),
            path_style: c.path_style,
            prefix: p.clone(),
            static_keys,
            part_size: part,
            timeout: c.timeout.get(),
        }))
    }
}

impl StreamConfig {
    fn validate(&self, max_event_bytes: u64) -> Result<StreamSettings, ConfigError> {
        if self.kind == StreamKind::Files {
            return Ok(StreamSettings::Files);
        }
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid(
                "stream.kafka.brokers",
                "must be set when stream.kind = \"kafka\" (host:port, comma-separated)",
            ));
        }
        let topic = crate::sink::stream::kafka::binding::TopicTemplate::parse(&k.topic)
            .map_err(|p| invalid("stream.kafka.topic", p))?;
        if k.delivery_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid(
                "stream.kafka.delivery_timeout",
                "must be at least 1s",
            ));
        }
        if k.recovery_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid(
                "stream.kafka.recovery_timeout",
                "must be at least 1s",
            ));
        }
        let mut props = vec![("client.id".to_owned(), k.client_id.clone())];
        if let Some(p) = &k.security_protocol {
            let lower = p.to_ascii_lowercase();
            if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&lower.as_str()) {
                return Err(invalid(
                    "stream.kafka.security_protocol",
                    format!("({p:?}) must be plaintext, ssl, sasl_plaintext or sasl_ssl"),
                ));
            }
            props.push(("security.protocol".to_owned(), lower));
        }
        if let Some(m) = &k.sasl_mechanism {
            let upper = m.to_ascii_uppercase();
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"].contains(&upper.as_str())
            {
                return Err(invalid(
                    "stream.kafka.sasl_mechanism",
                    format!("({m:?}) must be PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"),
                ));
            }
            props.push(("sasl.mechanism".to_owned(), upper));
        }
        match (&k.sasl_username, &k.sasl_password) {
            (Some(u), Some(p)) => {
                props.push(("sasl.username".to_owned(), u.clone()));
                props.push(("sasl.password".to_owned(), p.clone()));
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "stream.kafka.sasl_username",
                    "and sasl_password go together: set both or neither",
                ));
            }
        }
        if let Some(ca) = &k.ssl_ca_location {
            if !ca.exists() {
                return Err(invalid(
                    "stream.kafka.ssl_ca_location",
                    format!("({}) does not exist", ca.display()),
                ));
            }
            props.push(("ssl.ca.location".to_owned(), ca.display().to_string()));
        }
        for (name, value) in &k.properties {
            if KAFKA_OWN_PROPERTIES.contains(&name.as_str()) {
                return Err(invalid(
                    format!("stream.kafka.properties.{name:?}"),
                    "is set by the relay itself and cannot be overridden",
                ));
            }
            props.push((name.clone(), value.clone()));
        }
        Ok(StreamSettings::Kafka(KafkaSettings {
            brokers: k.brokers.trim().to_owned(),
            topic,
            client_properties: props,
            idempotence: k.idempotence,
            delivery_timeout: k.delivery_timeout.get(),
            recovery_window: k.recovery_window.get(),
            recovery_timeout: k.recovery_timeout.get(),
            max_message_bytes: (max_event_bytes + (64 << 10)).max(1_000_000),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_text_parses_to_the_defaults() {
        let parsed = RelayConfig::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(parsed, RelayConfig::default());
        let checked = parsed.validate().unwrap();
        assert!(checked.gateways.is_empty());
        assert_eq!(checked.limits.max_request_bytes, 16 << 20);
        assert_eq!(checked.limits.max_object_bytes, 4 << 30);
        assert_eq!(checked.limits.max_concurrent_uploads, 64);
        assert_eq!(
            checked.uploads.abandon_after,
            std::time::Duration::from_secs(7 * 86_400)
        );
        // The data dir is made absolute, and the default base URL names its objects/.
        assert!(checked.data_dir.is_absolute(), "{:?}", checked.data_dir);
        let url = &checked.objects.base_url;
        assert!(url.starts_with("file:///"), "{url}");
        assert!(url.ends_with("/pigeon-relay-data/objects/"), "{url}");
    }

    #[test]
    fn objects_in_s3() {
        let c = RelayConfig::parse(
            r#"
            [objects]
            kind = "s3"
            [objects.s3]
            bucket = "pigeon-files"
            endpoint = "http://127.0.0.1:3900"
            path_style = true
            prefix = "site-1/"
            access_key_id = "GK1"
            secret_access_key = "secret"
            part_size = "16MiB"
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        let s = c.objects.s3.clone().unwrap();
        assert_eq!(s.bucket, "pigeon-files");
        assert_eq!(s.part_size, 16 << 20);
        assert_eq!(s.static_keys, Some(("GK1".into(), "secret".into())));
        assert_eq!(s.region, None);
        // The default base URL names the bucket's objects/.
        assert_eq!(c.objects.base_url, "s3://pigeon-files/site-1/objects/");
        // Files by default, whatever [objects.s3] says.
        let files = RelayConfig::parse("[objects.s3]\nbucket = \"b\"\n")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(files.objects.s3, None);

        let s3 = |rest: &str| format!("[objects]\nkind = \"s3\"\n[objects.s3]\n{rest}\n");
        for (toml, key) in [
            (s3(""), "objects.s3.bucket"),
            (s3("bucket = \"Upper_Case\""), "objects.s3.bucket"),
            (s3("bucket = \"ab\""), "objects.s3.bucket"),
            (
                s3("bucket = \"b-1\"\nendpoint = \"127.0.0.1:3900\""),
                "objects.s3.endpoint",
            ),
            (
                s3("bucket = \"b-1\"\nprefix = \"no-slash\""),
                "objects.s3.prefix",
            ),
            (
                s3("bucket = \"b-1\"\nprefix = \"/abs/\""),
                "objects.s3.prefix",
            ),
            (
                s3("bucket = \"b-1\"\nprefix = \"a//b/\""),
                "objects.s3.prefix",
            ),
            (
                s3("bucket = \"b-1\"\naccess_key_id = \"k\""),
                "objects.s3.access_key_id",
            ),
            (
                s3("bucket = \"b-1\"\npart_size = \"4MiB\""),
                "objects.s3.part_size",
            ),
            (
                s3("bucket = \"b-1\"\npart_size = \"5000000\""),
                "objects.s3.part_size",
            ),
            (
                s3("bucket = \"b-1\"\ntimeout = \"0s\""),
                "objects.s3.timeout",
            ),
            (s3("bucket = \"b-1\"\nregion = 3"), "region = 3"),
            (s3("bucket = \"b-1\"\nbukket = \"x\""), "bukket"),
        ] {
            let e = match RelayConfig::parse(&toml) {
                Ok(c) => c.validate().map(drop).unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(key), "{toml:?} -> {e}");
        }
        // 4 GiB in 5 MiB parts needs 820 parts: fine; S3 takes 10,000 parts at most.
        let e = RelayConfig::parse(&format!(
            "[limits]\nmax_object_bytes = \"100GiB\"\n{}",
            s3("bucket = \"b-1\"\npart_size = \"5MiB\"")
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("10000 parts"), "{e}");
    }

    #[test]
    fn capture_needs_s3_and_a_valid_group() {
        let s3 = "[objects]\nkind = \"s3\"\n[objects.s3]\nbucket = \"b-1\"\n";
        let on = |rest: &str| format!("{s3}[capture]\nenabled = true\n{rest}");
        let c = RelayConfig::parse(&on("roll_bytes = \"1MiB\"\nroll_age = \"30s\"\n"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            c.capture,
            Some(CaptureSettings {
                roll_bytes: 1 << 20,
                roll_age: std::time::Duration::from_secs(30),
                group: "pigeon-relay-capture".to_owned(),
            })
        );
        assert_eq!(RelayConfig::default().validate().unwrap().capture, None);
        // With Kafka, capture reads the topics with a consumer group.
        let kafka = RelayConfig::parse(&format!(
            "{}[stream]\nkind = \"kafka\"\n[stream.kafka]\nbrokers = \"k:9092\"\n",
            on("group = \"lake.bronze\"\n")
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(kafka.capture.unwrap().group, "lake.bronze");
        let message = |toml: &str| {
            RelayConfig::parse(toml)
                .unwrap()
                .validate()
                .map(drop)
                .unwrap_err()
                .to_string()
        };
        for (toml, want) in [
            ("[capture]\nenabled = true\n".to_owned(), "objects.kind"),
            (on("group = \"a/b\"\n"), "capture.group"),
            (on("group = \"\"\n"), "capture.group"),
            (on("roll_bytes = \"1KiB\"\n"), "capture.roll_bytes"),
            (on("roll_age = \"0s\"\n"), "capture.roll_age"),
        ] {
            let e = message(&toml);
            assert!(e.contains(want), "{toml:?} -> {e}");
        }
    }

    #[test]
    fn objects_and_uploads_tables() {
        let c = RelayConfig::parse(
            r#"
            data_dir = "/srv/pigeon relay"
            [limits]
            max_object_bytes = "100MiB"
            max_concurrent_uploads = 4
            [objects]
            base_url = "https://files.example.com/pigeon/"
            [uploads]
            abandon_after = "2h"
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.limits.max_object_bytes, 100 << 20);
        assert_eq!(c.limits.max_concurrent_uploads, 4);
        assert_eq!(c.objects.base_url, "https://files.example.com/pigeon/");
        assert_eq!(
            c.uploads.abandon_after,
            std::time::Duration::from_secs(7200)
        );
        // Without base_url: the objects directory as a file URL, spaces encoded.
        let c = RelayConfig::parse("data_dir = \"/srv/pigeon relay\"\n")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.objects.base_url, "file:///srv/pigeon%20relay/objects/");
    }

    #[test]
    fn file_urls_encode_what_is_not_plain() {
        assert_eq!(
            file_url(Path::new("/var/lib/pigeon-relay/objects")),
            "file:///var/lib/pigeon-relay/objects"
        );
        assert_eq!(file_url(Path::new("/a b/ü%")), "file:///a%20b/%C3%BC%25");
    }

    #[test]
    fn commented_gateway_examples_are_valid() {
        // The examples in the default file, uncommented, must work as written.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|l| {
                let t = l.trim_start_matches("# ");
                if t.starts_with("[[gateways]]") || t.starts_with("id =") || t.starts_with("token")
                {
                    t
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = RelayConfig::parse(&uncommented)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(c.gateways[1].gateway.as_str(), "pi-2");
    }

    #[test]
    fn full_example() {
        let c = RelayConfig::parse(
            r#"
            listen = "0.0.0.0:9000"
            data_dir = "/var/lib/pigeon-relay"
            [limits]
            max_request_bytes = "1MiB"
            max_concurrent_requests = 8
            [[gateways]]
            id = "pi-1"
            token = "0123456789abcdef"
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_request_bytes, 1 << 20);
        assert_eq!(c.limits.max_decompressed_bytes, 64 << 20);
        assert_eq!(c.limits.max_concurrent_requests, 8);
        assert_eq!(
            c.gateways[0].digest,
            Some(TokenDigest::of_token("0123456789abcdef"))
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = RelayConfig::parse("listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
        let e = RelayConfig::parse("[limits]\nmax_body = 3\n").unwrap_err();
        assert!(e.to_string().contains("max_body"), "{e}");
        let e = RelayConfig::parse("[[gateways]]\nid = \"a\"\ntokn = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = RelayConfig::parse("[limits]\nmax_request_bytes = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("max_request_bytes"), "{e}");
        let e = RelayConfig::parse("listen = \"localhost\"\n").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = RelayConfig::parse("[[gateways]]\nid = \"a/b\"\ntoken = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid gateway id"), "{e}");
    }

    #[test]
    fn each_gateways_share_is_checked_against_the_largest_body() {
        let c = RelayConfig::default().validate().unwrap();
        assert_eq!(c.limits.max_requests_per_gateway, 8);
        assert_eq!(c.limits.max_buffered_bytes_per_gateway, 32 << 20);
        assert_eq!(c.limits.max_buffered_bytes, 512 << 20);
        assert_eq!(c.limits.body_idle_timeout.as_secs(), 15);
        assert_eq!(c.limits.body_timeout.as_secs(), 60);
        assert_eq!(c.limits.header_timeout.as_secs(), 30);
        assert_eq!(c.limits.max_connections, 16_384);
        for (toml, key) in [
            (
                "max_requests_per_gateway = 0",
                "limits.max_requests_per_gateway",
            ),
            // Smaller than one full batch (16 MiB): that gateway could never send one.
            (
                "max_buffered_bytes_per_gateway = \"8MiB\"",
                "limits.max_buffered_bytes_per_gateway",
            ),
            (
                "max_buffered_bytes = \"16MiB\"",
                "limits.max_buffered_bytes",
            ),
            ("body_idle_timeout = \"0s\"", "limits.body_idle_timeout"),
            ("header_timeout = \"0s\"", "limits.header_timeout"),
            // Fewer connections than requests at once: the request limit could never bite.
            ("max_connections = 100", "limits.max_connections"),
            ("max_connections = 2000000", "limits.max_connections"),
            (
                "body_idle_timeout = \"30s\"\nbody_timeout = \"20s\"",
                "limits.body_timeout",
            ),
        ] {
            assert_eq!(invalid_key(&format!("[limits]\n{toml}\n")), key, "{toml}");
        }
        let e = RelayConfig::parse("[limits]\nmax_buffered_bytes_per_gateway = \"8MiB\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("(8MiB)") && e.contains("16MiB"), "{e}");
    }

    #[test]
    fn issue_24_a_token_no_header_can_carry_is_refused() {
        let e = RelayConfig::parse("[[gateways]]\nid = \"a\"\ntoken = \"abc\\ndef0123456789\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gateways[0].token") && e.contains("a line break at character 4"),
            "{e}"
        );
    }

    fn invalid_key(toml: &str) -> String {
        match RelayConfig::parse(toml).unwrap().validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_key() {
        let tok = |id: &str, t: &str| format!("[[gateways]]\nid = \"{id}\"\ntoken = \"{t}\"\n");
        assert_eq!(
            invalid_key(&(tok("a", "secret-one-0123456") + &tok("a", "secret-two-0123456"))),
            "gateways[1].id"
        );
        assert_eq!(
            invalid_key(&(tok("a", "same-secret-012345") + &tok("b", "same-secret-012345"))),
            "gateways[1].token"
        );
        assert_eq!(
            invalid_key("[[gateways]]\nid = \"a\"\n"),
            "gateways[0].token"
        );
        assert_eq!(
            invalid_key("[[gateways]]\nid = \"a\"\ntoken = \"x\"\ntoken_sha256 = \"00\"\n"),
            "gateways[0].token"
        );
        assert_eq!(
            invalid_key("[[gateways]]\nid = \"a\"\ntoken_sha256 = \"abc\"\n"),
            "gateways[0].token_sha256"
        );
        assert_eq!(
            invalid_key(
                "[limits]\nmax_event_bytes = \"2MiB\"\nmax_decompressed_bytes = \"1MiB\"\n"
            ),
            "limits.max_event_bytes"
        );
        assert_eq!(
            invalid_key("[limits]\nmax_events_per_request = 0\n"),
            "limits.max_events_per_request"
        );
        assert_eq!(
            invalid_key("[limits]\nmax_concurrent_requests = 0\n"),
            "limits.max_concurrent_requests"
        );
        assert_eq!(invalid_key("[sink]\nqueue_depth = 0\n"), "sink.queue_depth");
        assert_eq!(
            invalid_key("[limits]\nmax_object_bytes = 0\n"),
            "limits.max_object_bytes"
        );
        assert_eq!(
            invalid_key("[limits]\nmax_concurrent_uploads = 0\n"),
            "limits.max_concurrent_uploads"
        );
        assert_eq!(
            invalid_key("[uploads]\nabandon_after = \"59s\"\n"),
            "uploads.abandon_after"
        );
        for bad in ["file:///srv/objects", "no-scheme/", "s3://bucket/a b/"] {
            assert_eq!(
                invalid_key(&format!("[objects]\nbase_url = {bad:?}\n")),
                "objects.base_url",
                "{bad}"
            );
        }
        assert_eq!(
            invalid_key("[sink]\nretry_after = \"500ms\"\n"),
            "sink.retry_after"
        );
    }

    #[test]
    fn token_sha256_is_accepted_in_either_case() {
        let hex = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let c = RelayConfig::parse(&format!(
            "[[gateways]]\nid = \"a\"\ntoken_sha256 = \"{hex}\"\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
        // sha256("test")
        assert_eq!(c.gateways[0].digest, Some(TokenDigest::of_token("test")));
    }

    #[test]
    fn kafka_stream_and_tenants() {
        let c = RelayConfig::parse(
            r#"
            [stream]
            kind = "kafka"
            [stream.kafka]
            brokers = " ns.servicebus.windows.net:9093 "
            topic = "pigeon.{tenant}.{type}"
            security_protocol = "SASL_SSL"
            sasl_mechanism = "plain"
            sasl_username = "$ConnectionString"
            sasl_password = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s"
            [stream.kafka.properties]
            "compression.type" = "lz4"
            [[gateways]]
            id = "pi-1"
            token = "a-long-random-secret-1"
            tenant = "acme"
            [[gateways]]
            id = "pi-2"
            token = "a-long-random-secret-2"
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        let StreamSettings::Kafka(k) = &c.stream else {
            panic!("not kafka: {:?}", c.stream);
        };
        assert_eq!(k.brokers, "ns.servicebus.windows.net:9093");
        assert_eq!(k.topic.as_str(), "pigeon.{tenant}.{type}");
        let props: Vec<(&str, &str)> = k
            .client_properties
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(props[0], ("client.id", "pigeon-relay"));
        assert!(props.contains(&("security.protocol", "sasl_ssl")));
        assert!(props.contains(&("sasl.mechanism", "PLAIN")));
        assert!(props.contains(&("sasl.username", "$ConnectionString")));
        assert!(props.contains(&("compression.type", "lz4")));
        assert!(k.idempotence);
        assert_eq!(k.delivery_timeout, std::time::Duration::from_secs(10));
        assert_eq!(c.tenants[&GatewayId::new("pi-1").unwrap()], "acme");
        assert_eq!(c.tenants[&GatewayId::new("pi-2").unwrap()], DEFAULT_TENANT);
        // The files stream is the default, and ignores [stream.kafka].
        let c = RelayConfig::default().validate().unwrap();
        assert_eq!(c.stream, StreamSettings::Files);
    }

    #[test]
    fn kafka_and_tenant_mistakes_name_the_key() {
        let kafka = |extra: &str| {
            format!("[stream]\nkind = \"kafka\"\n[stream.kafka]\nbrokers = \"k:9092\"\n{extra}")
        };
        assert_eq!(
            invalid_key("[stream]\nkind = \"kafka\"\n"),
            "stream.kafka.brokers"
        );
        assert_eq!(
            invalid_key(&kafka("topic = \"pigeon\"\n")),
            "stream.kafka.topic"
        );
        assert_eq!(
            invalid_key(&kafka("topic = \"a/{tenant}\"\n")),
            "stream.kafka.topic"
        );
        assert_eq!(
            invalid_key(&kafka("security_protocol = \"tls\"\n")),
            "stream.kafka.security_protocol"
        );
        assert_eq!(
            invalid_key(&kafka("sasl_mechanism = \"GSSAPI\"\n")),
            "stream.kafka.sasl_mechanism"
        );
        assert_eq!(
            invalid_key(&kafka("sasl_username = \"u\"\n")),
            "stream.kafka.sasl_username"
        );
        assert_eq!(
            invalid_key(&kafka("delivery_timeout = \"100ms\"\n")),
            "stream.kafka.delivery_timeout"
        );
        assert_eq!(
            invalid_key(&kafka("ssl_ca_location = \"/nonexistent/ca.pem\"\n")),
            "stream.kafka.ssl_ca_location"
        );
        assert_eq!(
            invalid_key(&kafka("[stream.kafka.properties]\n\"acks\" = \"1\"\n")),
            "stream.kafka.properties.\"acks\""
        );
        for bad in ["Acme", "", "-acme", "a/b", &"x".repeat(65)] {
            assert_eq!(
                invalid_key(&format!(
                    "[[gateways]]\nid = \"pi-1\"\ntoken = \"a-long-random-secret\"\ntenant = {bad:?}\n"
                )),
                "gateways[0].tenant",
                "{bad:?}"
            );
        }
        assert!(RelayConfig::parse("[stream]\nkind = \"nats\"\n").is_err());
    }

    #[test]
    fn tls_needs_both_files_and_client_auth_needs_a_ca() {
        assert_eq!(invalid_key("[tls]\ncert = \"c.pem\"\n"), "tls.key");
        assert_eq!(invalid_key("[tls]\nkey = \"k.pem\"\n"), "tls.cert");
        assert_eq!(
            invalid_key("[tls]\nclient_ca = \"ca.pem\"\n"),
            "tls.client_ca"
        );
        let both = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        assert_eq!(
            invalid_key(&format!("{both}client_auth = \"required\"\n")),
            "tls.client_auth"
        );
        assert_eq!(
            invalid_key(&format!("{both}reload_check = \"100ms\"\n")),
            "tls.reload_check"
        );
        assert!(RelayConfig::parse(&format!("{both}client_auth = \"sometimes\"\n")).is_err());
        let c = RelayConfig::parse(both).unwrap().validate().unwrap();
        let t = c.tls.unwrap();
        assert_eq!((t.client_ca, t.client_auth_required), (None, false));
        assert!(RelayConfig::default().validate().unwrap().tls.is_none());
    }

    #[test]
    fn a_gateway_without_a_token_needs_client_certificates() {
        let gw = "[[gateways]]\nid = \"pi-1\"\n";
        assert_eq!(invalid_key(gw), "gateways[0].token");
        let mtls = format!(
            "{gw}[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\nclient_auth = \"required\"\n"
        );
        let c = RelayConfig::parse(&mtls).unwrap().validate().unwrap();
        assert_eq!(c.gateways[0].digest, None);
        assert!(c.tls.unwrap().client_auth_required);
    }
}
