//! `[capture]`: rolls of events into the bucket, checked into [`CaptureSettings`].

use pigeon_shared::units::{ByteSize, Duration};
use serde::Deserialize;

use crate::config::error::{ConfigError, invalid};

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

impl CaptureConfig {
    pub fn validate(&self, s3: bool) -> Result<Option<CaptureSettings>, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn on(rest: &str) -> String {
        format!("enabled = true\n{rest}")
    }

    fn message(toml: &str, s3: bool) -> String {
        toml::from_str::<CaptureConfig>(toml)
            .unwrap()
            .validate(s3)
            .map(drop)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn capture_needs_s3_and_a_valid_group() {
        let c: CaptureConfig =
            toml::from_str(&on("roll_bytes = \"1MiB\"\nroll_age = \"30s\"\n")).unwrap();
        assert_eq!(
            c.validate(true).unwrap(),
            Some(CaptureSettings {
                roll_bytes: 1 << 20,
                roll_age: std::time::Duration::from_secs(30),
                group: "pigeon-relay-capture".to_owned(),
            })
        );
        assert_eq!(CaptureConfig::default().validate(true).unwrap(), None);
        // With Kafka, capture reads the topics with this consumer group.
        let c: CaptureConfig = toml::from_str(&on("group = \"lake.bronze\"\n")).unwrap();
        assert_eq!(c.validate(true).unwrap().unwrap().group, "lake.bronze");
        let e = message(&on(""), false);
        assert!(e.contains("objects.kind"), "{e}");
        for (toml, want) in [
            (on("group = \"a/b\"\n"), "capture.group"),
            (on("group = \"\"\n"), "capture.group"),
            (on("roll_bytes = \"1KiB\"\n"), "capture.roll_bytes"),
            (on("roll_age = \"0s\"\n"), "capture.roll_age"),
        ] {
            let e = message(&toml, true);
            assert!(e.contains(want), "{toml:?} -> {e}");
        }
    }
}
