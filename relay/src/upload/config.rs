//! `[uploads]`: the resumable upload endpoint, checked into [`UploadSettings`].

use pigeon_shared::units::Duration;
use serde::Deserialize;

use crate::config::error::{ConfigError, invalid};

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

/// Checked `[uploads]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadSettings {
    pub abandon_after: std::time::Duration,
}

/// The shortest `uploads.abandon_after`.
pub const MIN_ABANDON_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl UploadsConfig {
    pub fn validate(&self) -> Result<UploadSettings, ConfigError> {
        if self.abandon_after.get() < MIN_ABANDON_AFTER {
            return Err(invalid("uploads.abandon_after", "must be at least 1m"));
        }
        Ok(UploadSettings {
            abandon_after: self.abandon_after.get(),
        })
    }
}
