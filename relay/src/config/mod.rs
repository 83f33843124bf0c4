//! The relay's configuration file: serde structs that mirror the TOML, and
//! [`RelayConfig::validate`] into the checked [`Config`] the rest of the relay uses.
//!
//! Every key is documented in `docs/configuration-relay.md`; [`DEFAULT_CONFIG`] is the
//! commented file `pigeon-relay print-default-config` prints.

//!
//! Each section's raw struct, its checked settings and its checks live next to the code
//! that uses them: `[limits]` in [`crate::admission::config`], `[sink]` in
//! [`crate::sink::config`], `[stream]` in [`crate::sink::stream::config`] and
//! [`crate::sink::stream::kafka::config`], `[objects]` in
//! [`crate::upload::objects::config`], `[uploads]` in [`crate::upload::config`],
//! `[capture]` in [`crate::capture::config`], `[tls]` in [`crate::tls::config`],
//! `[fleet]` and `[[operators]]` in [`crate::fleet::config`]. This
//! module holds the file as a whole, its loading, `[[gateways]]`, and the order in which
//! the sections are checked.

pub mod error;
pub mod tenant;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pigeon_shared::ce::GatewayId;
use pigeon_shared::units::Duration;
use serde::Deserialize;

pub use error::ConfigError;
use error::invalid;
pub use tenant::check_tenant;

use crate::admission::config::{Limits, LimitsConfig};
use crate::auth::{Credential, TokenDigest};
use crate::capture::config::{CaptureConfig, CaptureSettings};
use crate::fleet::config::{FleetConfig, FleetSettings, OperatorConfig, check_operators};
use crate::fleet::operators::OperatorCredential;
use crate::sink::config::{SinkConfig, SinkSettings};
use crate::sink::stream::config::{StreamConfig, StreamSettings};
use crate::tls::config::TlsConfig;
use crate::upload::config::{UploadSettings, UploadsConfig};
use crate::upload::objects::config::{ObjectSettings, ObjectsConfig};

/// The commented default configuration; it parses to [`RelayConfig::default`].
pub const DEFAULT_CONFIG: &str = include_str!("../default-config.toml");

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
    pub fleet: FleetConfig,
    pub gateways: Vec<GatewayConfig>,
    pub operators: Vec<OperatorConfig>,
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
            fleet: FleetConfig::default(),
            gateways: Vec::new(),
            operators: Vec::new(),
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
    pub fleet: FleetSettings,
    /// Who may read the fleet view.
    pub operators: Vec<OperatorCredential>,
}

/// The tenant of gateways that name none, and of every event in unauthenticated mode.
pub const DEFAULT_TENANT: &str = "default";

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
        let limits = self.limits.validate()?;
        let uploads = self.uploads.validate()?;
        let sink = self.sink.validate()?;
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
        let objects = self.objects.validate(&data_dir, limits.max_object_bytes)?;
        let tls = self.tls.validate()?;
        let (gateways, tenants) = check_gateways(&self.gateways, tls.as_ref())?;
        let stream = self.stream.validate(limits.max_event_bytes)?;
        let capture = self.capture.validate(objects.s3.is_some())?;
        let fleet = self.fleet.validate()?;
        let operators = check_operators(&self.operators, &gateways, &tenants)?;

        Ok(Config {
            listen: self.listen,
            data_dir,
            allow_unauthenticated: self.allow_unauthenticated,
            shutdown_timeout: self.shutdown_timeout.get(),
            limits,
            sink,
            stream,
            objects,
            capture,
            uploads,
            tls,
            gateways,
            tenants,
            fleet,
            operators,
        })
    }
}

/// Checks `[[gateways]]`: ids and tokens unique, each gateway identified by a token or
/// (with `tls.client_ca`) its certificate, tenants well-formed. Returns the credentials
/// and each gateway's tenant.
fn check_gateways(
    configured: &[GatewayConfig],
    tls: Option<&crate::tls::TlsSettings>,
) -> Result<(Vec<Credential>, HashMap<GatewayId, String>), ConfigError> {
    let certificates = tls.is_some_and(|t| t.client_ca.is_some());
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    let mut gateways = Vec::with_capacity(configured.len());
    let mut tenants = HashMap::with_capacity(configured.len());
    for (i, g) in configured.iter().enumerate() {
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
                pigeon_shared::wire::check_bearer_token(t).map_err(|e| invalid(key("token"), e))?;
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
    Ok((gateways, tenants))
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
    fn capture_needs_the_bucket_of_objects_s3() {
        let s3 = "[objects]\nkind = \"s3\"\n[objects.s3]\nbucket = \"b-1\"\n";
        let c = RelayConfig::parse(&format!("{s3}[capture]\nenabled = true\n"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.capture.unwrap().group, "pigeon-relay-capture");
        assert_eq!(RelayConfig::default().validate().unwrap().capture, None);
        assert_eq!(
            invalid_key("[capture]\nenabled = true\n"),
            "capture.enabled"
        );
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
    fn commented_gateway_and_operator_examples_are_valid() {
        // The examples in the default file, uncommented, must work as written.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|l| {
                let t = l.trim_start_matches("# ");
                let example = [
                    "[[gateways]]",
                    "[[operators]]",
                    "id =",
                    "name =",
                    "token =",
                    "token_sha256 =",
                    "tenant =",
                    "tenants =",
                ];
                if example.iter().any(|e| t.starts_with(e)) {
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
        assert_eq!(c.tenants[&c.gateways[0].gateway], "acme");
        assert_eq!(c.operators.len(), 2);
        assert_eq!(c.operators[1].name, "acme-support");
        assert_eq!(
            c.operators[1].tenants,
            Some(HashSet::from(["acme".to_owned()]))
        );
    }

    #[test]
    fn fleet_and_operators_in_the_file() {
        let c = RelayConfig::parse(
            r#"
            [fleet]
            heartbeat_interval = "30s"
            max_gateway_series = 50
            [[gateways]]
            id = "pi-1"
            token = "gateway-secret-0123"
            [[operators]]
            name = "noc"
            token = "operator-secret-0123"
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(
            c.fleet.heartbeat_interval,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(c.fleet.max_gateway_series, 50);
        assert_eq!(
            c.operators[0].digest,
            TokenDigest::of_token("operator-secret-0123")
        );
        assert_eq!(
            invalid_key("[fleet]\nheartbeat_interval = \"0s\"\n"),
            "fleet.heartbeat_interval"
        );
        assert_eq!(
            invalid_key(
                "[[gateways]]\nid = \"pi-1\"\ntoken = \"same-secret-012345\"\n[[operators]]\nname = \"noc\"\ntoken = \"same-secret-012345\"\n"
            ),
            "operators[0].token"
        );
        let e = RelayConfig::parse("[[operators]]\nname = \"noc\"\ntokn = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
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
