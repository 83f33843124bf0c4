//! `[stream]`: where accepted events go, checked into [`StreamSettings`].

use serde::Deserialize;

use super::kafka::config::{KafkaConfig, KafkaSettings};
use crate::config::error::ConfigError;

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

/// Checked `[stream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSettings {
    Files,
    Kafka(KafkaSettings),
}

impl StreamConfig {
    pub fn validate(&self, max_event_bytes: u64) -> Result<StreamSettings, ConfigError> {
        if self.kind == StreamKind::Files {
            return Ok(StreamSettings::Files);
        }
        self.kafka
            .validate(max_event_bytes)
            .map(StreamSettings::Kafka)
    }
}
