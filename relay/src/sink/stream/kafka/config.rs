//! `[stream.kafka]`: the brokers, the topic template and the client's properties,
//! checked into [`KafkaSettings`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use pigeon_shared::units::Duration;
use serde::Deserialize;

use super::binding::TopicTemplate;
use crate::config::error::{ConfigError, invalid};

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

/// Checked `[stream.kafka]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: TopicTemplate,
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

impl KafkaConfig {
    /// Checks `[stream.kafka]` for a stream whose events are at most `max_event_bytes`.
    pub fn validate(&self, max_event_bytes: u64) -> Result<KafkaSettings, ConfigError> {
        let k = self;
        if k.brokers.trim().is_empty() {
            return Err(invalid(
                "stream.kafka.brokers",
                "must be set when stream.kind = \"kafka\" (host:port, comma-separated)",
            ));
        }
        let topic = TopicTemplate::parse(&k.topic).map_err(|p| invalid("stream.kafka.topic", p))?;
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
        Ok(KafkaSettings {
            brokers: k.brokers.trim().to_owned(),
            topic,
            client_properties: props,
            idempotence: k.idempotence,
            delivery_timeout: k.delivery_timeout.get(),
            recovery_window: k.recovery_window.get(),
            recovery_timeout: k.recovery_timeout.get(),
            max_message_bytes: (max_event_bytes + (64 << 10)).max(1_000_000),
        })
    }
}
