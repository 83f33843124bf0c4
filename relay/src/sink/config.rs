//! `[sink]`: the sink writer's queue, checkpoints and `Retry-After`, checked into
//! [`SinkSettings`].

use pigeon_shared::units::Duration;
use serde::Deserialize;

use crate::config::error::{ConfigError, invalid};

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

/// Checked `[sink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkSettings {
    pub checkpoint_interval: std::time::Duration,
    pub queue_depth: usize,
    pub retry_after: std::time::Duration,
}

impl SinkConfig {
    pub fn validate(&self) -> Result<SinkSettings, ConfigError> {
        let s = self;
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
        Ok(SinkSettings {
            checkpoint_interval: s.checkpoint_interval.get(),
            queue_depth: s.queue_depth,
            retry_after: s.retry_after.get(),
        })
    }
}
