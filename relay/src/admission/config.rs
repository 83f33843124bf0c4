//! `[limits]`: request size and concurrency limits, checked into [`Limits`].

use pigeon_shared::units::{ByteSize, Duration};
use serde::Deserialize;

use crate::config::error::{ConfigError, invalid};
use crate::upload::CREATE_OVERHEAD;

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

/// The most a concurrency limit may allow (tokio's semaphore has a hard upper bound on
/// permits).
const MAX_PERMITS: usize = 1_000_000;

impl LimitsConfig {
    /// Checks `[limits]`: each limit on its own and against the others.
    pub fn validate(&self) -> Result<Limits, ConfigError> {
        self.check_requests()?;
        self.check_shares()?;
        self.check_connections()?;
        let l = self;
        Ok(Limits {
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
        })
    }

    /// Sizes and counts of one request or upload, and the concurrency limits.
    fn check_requests(&self) -> Result<(), ConfigError> {
        let l = self;
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
        Ok(())
    }

    /// Each gateway's share of the buffered bytes, and the relay's.
    fn check_shares(&self) -> Result<(), ConfigError> {
        let l = self;
        // A gateway must be able to send its largest request, and its largest upload's
        // create (its event and the CreateUpload around it).
        let largest_body = l
            .max_request_bytes
            .get()
            .max(l.max_event_bytes.get() + CREATE_OVERHEAD);
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
        Ok(())
    }

    /// Connections and the deadlines of headers and bodies.
    fn check_connections(&self) -> Result<(), ConfigError> {
        let l = self;
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::refused_key;

    fn invalid_key(toml: &str) -> String {
        refused_key(toml, LimitsConfig::validate)
    }

    #[test]
    fn each_gateways_share_is_checked_against_the_largest_body() {
        let limits = LimitsConfig::default().validate().unwrap();
        assert_eq!(limits.max_requests_per_gateway, 8);
        assert_eq!(limits.max_buffered_bytes_per_gateway, 32 << 20);
        assert_eq!(limits.max_buffered_bytes, 512 << 20);
        assert_eq!(limits.body_idle_timeout.as_secs(), 15);
        assert_eq!(limits.body_timeout.as_secs(), 60);
        assert_eq!(limits.header_timeout.as_secs(), 30);
        assert_eq!(limits.max_connections, 16_384);
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
            assert_eq!(invalid_key(&format!("{toml}\n")), key, "{toml}");
        }
        let e = toml::from_str::<LimitsConfig>("max_buffered_bytes_per_gateway = \"8MiB\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("(8MiB)") && e.contains("16MiB"), "{e}");
    }
}
