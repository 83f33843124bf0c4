//! The relay's configuration file: serde structs that mirror the TOML, and
//! [`RelayConfig::validate`] into the checked [`Config`] the rest of the relay uses.
//!
//! Every key is documented in `docs/configuration-relay.md`; [`DEFAULT_CONFIG`] is the
//! commented file `pigeon-relay print-default-config` prints.

use std::collections::HashSet;
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: ByteSize::mib(16),
            max_decompressed_bytes: ByteSize::mib(64),
            max_event_bytes: ByteSize::mib(1),
            max_events_per_request: 100_000,
            max_concurrent_requests: 256,
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

/// `[[gateways]]`: one gateway allowed to send, with its bearer token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub id: GatewayId,
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
    pub gateways: Vec<Credential>,
}

/// Checked `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: u64,
    pub max_decompressed_bytes: u64,
    pub max_event_bytes: u64,
    pub max_events_per_request: usize,
    pub max_concurrent_requests: usize,
}

/// Checked `[sink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkSettings {
    pub checkpoint_interval: std::time::Duration,
    pub queue_depth: usize,
    pub retry_after: std::time::Duration,
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
        // tokio's semaphore has a hard upper bound on permits.
        if l.max_concurrent_requests > 1_000_000 {
            return Err(invalid(
                "limits.max_concurrent_requests",
                "must be at most 1000000",
            ));
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

        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        let mut gateways = Vec::with_capacity(self.gateways.len());
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
                (None, None) => {
                    return Err(invalid(
                        key("token"),
                        format!("is missing for gateway {}: set token or token_sha256", g.id),
                    ));
                }
                (Some(t), None) => {
                    if t.is_empty() {
                        return Err(invalid(key("token"), "must not be empty"));
                    }
                    if t.len() < 16 {
                        tracing::warn!(
                            gateway = %g.id,
                            length = t.len(),
                            "The gateway's token is shorter than 16 characters; use a long random secret."
                        );
                    }
                    TokenDigest::of_token(t)
                }
                (None, Some(hex)) => TokenDigest::from_hex(hex).ok_or_else(|| {
                    invalid(
                        key("token_sha256"),
                        "must be 64 hexadecimal digits (a SHA-256 digest)",
                    )
                })?,
            };
            if !digests.insert(digest) {
                return Err(invalid(
                    key("token"),
                    format!("of gateway {} is the same as another gateway's", g.id),
                ));
            }
            gateways.push(Credential {
                gateway: g.id.clone(),
                digest,
            });
        }

        Ok(Config {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            allow_unauthenticated: self.allow_unauthenticated,
            shutdown_timeout: self.shutdown_timeout.get(),
            limits: Limits {
                max_request_bytes: l.max_request_bytes.get(),
                max_decompressed_bytes: l.max_decompressed_bytes.get(),
                max_event_bytes: l.max_event_bytes.get(),
                max_events_per_request: l.max_events_per_request,
                max_concurrent_requests: l.max_concurrent_requests,
            },
            sink: SinkSettings {
                checkpoint_interval: s.checkpoint_interval.get(),
                queue_depth: s.queue_depth,
                retry_after: s.retry_after.get(),
            },
            gateways,
        })
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
            TokenDigest::of_token("0123456789abcdef")
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
        assert_eq!(c.gateways[0].digest, TokenDigest::of_token("test"));
    }
}
