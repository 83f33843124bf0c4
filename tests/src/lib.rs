//! End-to-end test harness for Pigeon: the real `pigeon-gateway` and `pigeon-relay`
//! binaries against a real mosquitto broker, all on loopback, each test with its own
//! processes, ports and temporary directory so tests run in parallel.
//!
//! * [`TestDir`] — a per-test temporary directory that collects the logs of everything
//!   started in it, prints their tails when the test fails, and is kept for inspection then.
//! * [`Proc`] — a child process with its stdout and stderr in a log file; killed on drop.
//! * [`Mosquitto`] — a broker on a free port with limits that never drop queued QoS 1
//!   messages for an offline persistent subscriber (the gateway).
//! * [`Relay`] and [`Gateway`] — write a config, start, SIGKILL, SIGTERM and restart the
//!   binaries found next to the test executable (or in `PIGEON_RELAY_BIN` /
//!   `PIGEON_GATEWAY_BIN`).
//! * [`Publisher`] — an MQTT load generator (rumqttc, QoS 1) that records which readings
//!   the broker PUBACKed, i.e. which ones Pigeon is responsible for from then on.
//! * [`Pipeline`] — all three of broker, relay and gateway, wired together.
//! * [`Stream`] — reads the relay's newline-delimited JSON stream files and checks that
//!   every expected reading is there exactly once.
//! * [`NotifySocket`] — systemd's end of `NOTIFY_SOCKET`, to see `READY=1`, watchdog
//!   pings and `STOPPING=1`.
//! * [`http_get`] and [`metric_value`] — the binaries' HTTP endpoints and `/metrics`.
//! * [`CameraFile`], [`files_section`], [`watch_table`] — camera files and the `[files]`
//!   config that watches them; `Relay::assert_files_exactly_once` checks what arrived.
//! * [`rss_kib`] and [`write_bytes`] — a process's memory and disk writes, for benchmarks.
//! * [`Tansu`] — a real Kafka-protocol broker (tansu) behind a proxy that can make it
//!   unreachable, and [`KafkaRecord`]s read back from it with librdkafka.
//! * [`Garage`] — a real S3-compatible server (garage, single node) behind a proxy that
//!   can make it unreachable, read back with aws-sdk-s3.
//! * [`PureFtpd`] — a real pure-ftpd with one virtual user, writing uploads in place or
//!   (`-0`) to a temporary then renamed file; curl as the camera that uploads to it
//!   ([`PureFtpd::upload`], [`PureFtpd::upload_slowly`]).
//!
//! Every wait is bounded ([`wait_until`]); timeouts can be stretched on a slow machine with
//! `PIGEON_E2E_TIMEOUT_SCALE`. See `docs/testing.md`.

mod dir;
mod files;
pub mod fleet;
mod ftp;
mod gateway;
mod http;
mod http_fault;
mod kafka;
mod mosquitto;
mod notify;
mod pipeline;
mod pki;
mod process;
mod procfs;
mod proxy;
mod publisher;
mod readings;
mod relay;
mod s3;
mod stream;

pub use dir::TestDir;
pub use files::{
    CameraFile, FileEvent, file_events, files_section, random_bytes, regular_files,
    wait_until_no_files, watch_table,
};
pub use ftp::{
    PUREFTPD_UPLOAD_PREFIX, PureFtpd, PureFtpdOptions, SlowUpload, UploadMode, is_pureftpd_temp,
};
pub use gateway::{Gateway, GatewayConfig, Subscription, Token};
pub use http::{curl_get, http_get, metric_value};
pub use http_fault::FailingProxy;
pub use kafka::{KafkaRecord, Tansu, kafka_stream_table, tansu_bin, wait_for_records};
pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use notify::NotifySocket;
pub use pipeline::{GATEWAY_ID, Pipeline, TOKEN};
pub use pki::{CertFiles, TestCa, replace_file};
pub use process::{Proc, describe, free_port, gateway_bin, is_root, relay_bin, run_command};
pub use procfs::{rss_kib, write_bytes};
pub use proxy::Proxy;
pub use publisher::{PublishReport, Publisher, PublisherOptions, Reading};
pub use readings::{READING_TYPE, climate_payload, climate_readings, climate_topic};
pub use relay::{Relay, capture_table, set_gateway_tenant};
pub use s3::{ACCESS_KEY, BUCKET, Garage, REGION, SECRET_KEY, StoredObject, garage_bin};
pub use stream::{Stream, summarize_numbers};

use std::future::Future;
use std::time::{Duration, Instant};

/// `d` multiplied by `PIGEON_E2E_TIMEOUT_SCALE` (a positive number, default 1).
pub fn scaled(d: Duration) -> Duration {
    let scale = std::env::var("PIGEON_E2E_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    d.mul_f64(scale)
}

/// Shorthand for `scaled(Duration::from_secs(secs))`.
pub fn secs(secs: u64) -> Duration {
    scaled(Duration::from_secs(secs))
}

/// Polls `check` every 100 ms until it returns `Ok`, and panics once `timeout` has passed,
/// saying what was awaited and what `check` last reported.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= timeout => {
                panic!(
                    "timed out after {:.1} s waiting for {what}: {last}",
                    start.elapsed().as_secs_f64()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `12345` → `"12,345"`.
pub fn fmt_count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(1000), "1,000");
        assert_eq!(fmt_count(9812), "9,812");
        assert_eq!(fmt_count(1_234_567), "1,234,567");
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for the impossible: still no")]
    async fn wait_until_gives_up_with_the_last_reason() {
        wait_until("the impossible", Duration::from_millis(200), || async {
            Err::<(), _>("still no".to_string())
        })
        .await;
    }
}
