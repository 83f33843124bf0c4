//! Counters the gateway's parts update and its logs (and later `/metrics` and `status`)
//! read. Plain atomics: cheap on the hot path, no locks.

use std::sync::atomic::{AtomicBool, AtomicU64};

#[derive(Debug, Default)]
pub struct Stats {
    pub mqtt_connected: AtomicBool,
    pub mqtt_received: AtomicU64,
    /// MQTT messages dropped because they were larger than `mqtt.max_packet_size`.
    pub mqtt_oversized: AtomicU64,
    pub relay_reachable: AtomicBool,
    pub upload_requests: AtomicU64,
    pub upload_failures: AtomicU64,
    pub events_delivered: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_dead_lettered: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Unix seconds of the last request the relay answered with results.
    pub last_upload_unix: AtomicU64,
}
