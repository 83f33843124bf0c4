//! Counters and histograms on atomics, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Status codes the ingest endpoint answers with, each with its own counter.
const CODES: [u16; 12] = [200, 400, 401, 403, 404, 408, 413, 415, 429, 500, 503, 0];

/// Why a request was refused at admission (`pigeon_relay_admission_refused_total`): the
/// global limits, then each client's share (see [`crate::admission`]).
pub const ADMISSION_LIMITS: [&str; 5] = [
    "requests",
    "uploads",
    "requests_per_gateway",
    "buffered_bytes_per_gateway",
    "buffered_bytes",
];

/// Status codes the fleet view answers with (`pigeon_relay_fleet_requests_total`); 0 is
/// any other. (A `405` is the router's, before the fleet view's handlers.)
const FLEET_CODES: [u16; 8] = [200, 400, 401, 404, 413, 414, 503, 0];

/// Which deadline stopped a request body (`pigeon_relay_request_body_timeouts_total`).
pub const BODY_DEADLINES: [&str; 2] = ["idle", "total"];

/// A histogram with fixed buckets (in seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Buckets for latencies, from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Adds one to a gauge for as long as it lives (also when a handler is dropped
/// mid-way because its client went away).
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    requests: [AtomicU64; CODES.len()],
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    pub requests_in_flight: AtomicU64,
    pub request_seconds: Histogram,
    pub sink_commit_seconds: Histogram,
    pub sink_commits: AtomicU64,
    pub sink_errors: AtomicU64,
    pub stream_bytes_written: AtomicU64,
    pub checkpoints_written: AtomicU64,
    pub checkpoint_errors: AtomicU64,
    pub dedup_producers: AtomicU64,
    pub sink_healthy: AtomicBool,
    pub uploads_created: AtomicU64,
    pub uploads_resumed: AtomicU64,
    pub upload_bytes_received: AtomicU64,
    pub uploads_accepted: AtomicU64,
    pub uploads_duplicate: AtomicU64,
    pub upload_digest_mismatches: AtomicU64,
    pub uploads_in_progress: AtomicU64,
    pub uploads_abandoned: AtomicU64,
    pub object_bytes_written: AtomicU64,
    /// S3 requests (every call, successful or not).
    pub object_store_seconds: Histogram,
    pub object_store_errors: AtomicU64,
    /// False after an S3 request failed, true again after one succeeded.
    pub object_store_healthy: AtomicBool,
    pub object_parts_sent: AtomicU64,
    pub capture_events: AtomicU64,
    pub capture_objects: AtomicU64,
    pub capture_bytes: AtomicU64,
    pub capture_errors: AtomicU64,
    pub capture_partitions: AtomicU64,
    pub capture_buffered_bytes: AtomicU64,
    /// TLS handshakes that failed or timed out (only with `[tls]`).
    pub tls_handshake_errors: AtomicU64,
    pub tls_reloads: AtomicU64,
    pub tls_reload_errors: AtomicU64,
    /// The served certificate's `notAfter`, Unix seconds; 0 without `[tls]`.
    pub tls_cert_not_after: AtomicU64,
    admission_refused: [AtomicU64; ADMISSION_LIMITS.len()],
    /// Request body bytes held in memory now (reserved by admission).
    pub buffered_body_bytes: AtomicU64,
    body_timeouts: [AtomicU64; BODY_DEADLINES.len()],
    /// Client connections open now (limits.max_connections).
    pub open_connections: AtomicU64,
    /// Times the accept loop found every connection slot taken and waited for one.
    pub connection_limit_reached: AtomicU64,
    /// Requests that were not valid HTTP/1.1, answered by hyper itself.
    pub malformed_requests: AtomicU64,
    fleet_requests: [AtomicU64; FLEET_CODES.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Default::default(),
            events_accepted: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            events_rejected: AtomicU64::new(0),
            requests_in_flight: AtomicU64::new(0),
            request_seconds: Histogram::new(LATENCY_BUCKETS),
            sink_commit_seconds: Histogram::new(LATENCY_BUCKETS),
            sink_commits: AtomicU64::new(0),
            sink_errors: AtomicU64::new(0),
            stream_bytes_written: AtomicU64::new(0),
            checkpoints_written: AtomicU64::new(0),
            checkpoint_errors: AtomicU64::new(0),
            dedup_producers: AtomicU64::new(0),
            sink_healthy: AtomicBool::new(true),
            uploads_created: AtomicU64::new(0),
            uploads_resumed: AtomicU64::new(0),
            upload_bytes_received: AtomicU64::new(0),
            uploads_accepted: AtomicU64::new(0),
            uploads_duplicate: AtomicU64::new(0),
            upload_digest_mismatches: AtomicU64::new(0),
            uploads_in_progress: AtomicU64::new(0),
            uploads_abandoned: AtomicU64::new(0),
            object_bytes_written: AtomicU64::new(0),
            object_store_seconds: Histogram::new(LATENCY_BUCKETS),
            object_store_errors: AtomicU64::new(0),
            object_store_healthy: AtomicBool::new(true),
            object_parts_sent: AtomicU64::new(0),
            capture_events: AtomicU64::new(0),
            capture_objects: AtomicU64::new(0),
            capture_bytes: AtomicU64::new(0),
            capture_errors: AtomicU64::new(0),
            capture_partitions: AtomicU64::new(0),
            capture_buffered_bytes: AtomicU64::new(0),
            tls_handshake_errors: AtomicU64::new(0),
            tls_reloads: AtomicU64::new(0),
            tls_reload_errors: AtomicU64::new(0),
            tls_cert_not_after: AtomicU64::new(0),
            admission_refused: Default::default(),
            buffered_body_bytes: AtomicU64::new(0),
            body_timeouts: Default::default(),
            open_connections: AtomicU64::new(0),
            connection_limit_reached: AtomicU64::new(0),
            malformed_requests: AtomicU64::new(0),
            fleet_requests: Default::default(),
        }
    }

    /// Counts one answered request to the fleet view.
    pub fn count_fleet_request(&self, code: u16) {
        let i = FLEET_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(FLEET_CODES.len() - 1);
        self.fleet_requests[i].fetch_add(1, Relaxed);
    }

    /// Counts a request refused by one of [`ADMISSION_LIMITS`].
    pub fn count_admission_refused(&self, limit: &str) {
        if let Some(i) = ADMISSION_LIMITS.iter().position(|&l| l == limit) {
            self.admission_refused[i].fetch_add(1, Relaxed);
        }
    }

    /// Requests refused so far by one of [`ADMISSION_LIMITS`].
    pub fn admission_refused(&self, limit: &str) -> u64 {
        ADMISSION_LIMITS
            .iter()
            .position(|&l| l == limit)
            .map_or(0, |i| self.admission_refused[i].load(Relaxed))
    }

    /// Counts a request body stopped by one of [`BODY_DEADLINES`].
    pub fn count_body_timeout(&self, deadline: &str) {
        if let Some(i) = BODY_DEADLINES.iter().position(|&d| d == deadline) {
            self.body_timeouts[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts one answered ingest request.
    pub fn count_request(&self, code: u16) {
        let i = CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CODES.len() - 1);
        self.requests[i].fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition, section by section.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_ingest(&mut out);
        self.render_sink(&mut out);
        self.render_uploads(&mut out);
        self.render_objects(&mut out);
        self.render_capture(&mut out);
        self.render_tls(&mut out);
        self.render_admission(&mut out);
        self.render_fleet(&mut out);
        out
    }

    /// Requests to the fleet view (its per-gateway series are rendered by
    /// [`crate::fleet::view::render_metrics`]).
    fn render_fleet(&self, out: &mut String) {
        let name = "pigeon_relay_fleet_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests to the fleet view (/v1/gateways) answered, by HTTP status code (401: no operator token, or a wrong one).\n# TYPE {name} counter"
        );
        for (code, c) in FLEET_CODES.iter().zip(&self.fleet_requests) {
            let label = if *code == 0 {
                "other".to_owned()
            } else {
                code.to_string()
            };
            let _ = writeln!(out, "{name}{{code=\"{label}\"}} {}", c.load(Relaxed));
        }
    }

    /// Requests, events, in flight, latency.
    fn render_ingest(&self, out: &mut String) {
        let name = "pigeon_relay_ingest_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Ingest requests answered, by HTTP status code."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (code, c) in CODES.iter().zip(&self.requests) {
            let label = if *code == 0 {
                "other".to_owned()
            } else {
                code.to_string()
            };
            let _ = writeln!(out, "{name}{{code=\"{label}\"}} {}", c.load(Relaxed));
        }

        let name = "pigeon_relay_ingest_events_total";
        let _ = writeln!(out, "# HELP {name} Events received, by result.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (result, c) in [
            ("accepted", &self.events_accepted),
            ("duplicate", &self.events_duplicate),
            ("rejected", &self.events_rejected),
        ] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {}", c.load(Relaxed));
        }

        gauge(
            out,
            "pigeon_relay_ingest_requests_in_flight",
            "Ingest requests being handled now.",
            self.requests_in_flight.load(Relaxed),
        );
        self.request_seconds.render(
            out,
            "pigeon_relay_ingest_request_seconds",
            "Time from reading an ingest request's headers to the answer.",
        );
    }

    /// Group commits, stream bytes, checkpoints, the dedup index.
    fn render_sink(&self, out: &mut String) {
        self.sink_commit_seconds.render(
            out,
            "pigeon_relay_sink_write_seconds",
            "Time of one group commit of the stream sink: append, fsync, index update.",
        );
        counter(
            out,
            "pigeon_relay_sink_commits_total",
            "Group commits of the stream sink.",
            self.sink_commits.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_sink_errors_total",
            "Stream files whose append or fsync failed.",
            self.sink_errors.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_stream_bytes_written_total",
            "Bytes appended durably to stream files.",
            self.stream_bytes_written.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_checkpoints_written_total",
            "Deduplication checkpoints written.",
            self.checkpoints_written.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_checkpoint_errors_total",
            "Deduplication checkpoints that could not be written.",
            self.checkpoint_errors.load(Relaxed),
        );
        gauge(
            out,
            "pigeon_relay_dedup_producers",
            "(gateway, producer) pairs in the deduplication index.",
            self.dedup_producers.load(Relaxed),
        );
        gauge(
            out,
            "pigeon_relay_sink_healthy",
            "1 while the stream sink's last write succeeded, 0 after a failure.",
            u64::from(self.sink_healthy.load(Relaxed)),
        );
    }

    /// File uploads: created, resumed, bytes, completed, abandoned.
    fn render_uploads(&self, out: &mut String) {
        counter(
            out,
            "pigeon_relay_uploads_created_total",
            "File uploads created (answered 201).",
            self.uploads_created.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_uploads_resumed_total",
            "File uploads continued from bytes the relay already held (a PATCH from an offset above 0, or a create that finished the job).",
            self.uploads_resumed.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_upload_bytes_received_total",
            "File bytes received and appended to unfinished uploads.",
            self.upload_bytes_received.load(Relaxed),
        );
        let name = "pigeon_relay_uploads_completed_total";
        let _ = writeln!(
            out,
            "# HELP {name} File uploads finished with their event durable, by result."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (result, c) in [
            ("accepted", &self.uploads_accepted),
            ("duplicate", &self.uploads_duplicate),
        ] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {}", c.load(Relaxed));
        }
        counter(
            out,
            "pigeon_relay_upload_digest_mismatches_total",
            "Uploaded files whose SHA-256 was not the one announced (their bytes were discarded).",
            self.upload_digest_mismatches.load(Relaxed),
        );
        gauge(
            out,
            "pigeon_relay_uploads_in_progress",
            "Upload PATCH requests being handled now.",
            self.uploads_in_progress.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_uploads_abandoned_total",
            "Unfinished uploads deleted after uploads.abandon_after without a touch.",
            self.uploads_abandoned.load(Relaxed),
        );
    }

    /// The object store: bytes, requests, health, parts.
    fn render_objects(&self, out: &mut String) {
        counter(
            out,
            "pigeon_relay_object_bytes_written_total",
            "Bytes of files stored as objects.",
            self.object_bytes_written.load(Relaxed),
        );
        self.object_store_seconds.render(
            out,
            "pigeon_relay_object_store_request_seconds",
            "Duration of each request to the object store (S3), successful or not.",
        );
        counter(
            out,
            "pigeon_relay_object_store_errors_total",
            "Requests to the object store (S3) that failed.",
            self.object_store_errors.load(Relaxed),
        );
        gauge(
            out,
            "pigeon_relay_object_store_healthy",
            "1 if the last request to the object store succeeded (always 1 for files).",
            u64::from(self.object_store_healthy.load(Relaxed)),
        );
        counter(
            out,
            "pigeon_relay_object_parts_sent_total",
            "Parts of files sent to S3 multipart uploads.",
            self.object_parts_sent.load(Relaxed),
        );
    }

    /// Capture objects and the capture consumer.
    fn render_capture(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "pigeon_relay_capture_events_total",
                "Events written to capture objects.",
                &self.capture_events,
            ),
            (
                "pigeon_relay_capture_objects_total",
                "Capture objects written (one per event type per roll).",
                &self.capture_objects,
            ),
            (
                "pigeon_relay_capture_bytes_total",
                "Compressed bytes of capture objects written.",
                &self.capture_bytes,
            ),
            (
                "pigeon_relay_capture_errors_total",
                "Capture passes that failed (retried every second).",
                &self.capture_errors,
            ),
        ] {
            counter(out, name, help, v.load(Relaxed));
        }
        gauge(
            out,
            "pigeon_relay_capture_partitions",
            "Kafka partitions this relay captures (its share of the capture consumer group).",
            self.capture_partitions.load(Relaxed),
        );
        gauge(
            out,
            "pigeon_relay_capture_buffered_bytes",
            "Event bytes read from Kafka and not yet in a capture object.",
            self.capture_buffered_bytes.load(Relaxed),
        );
    }

    /// Handshakes, reloads, certificate expiry.
    fn render_tls(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "pigeon_relay_tls_handshake_errors_total",
                "TLS handshakes that failed or timed out (a client that does not trust the certificate, a refused client certificate, a scanner).",
                &self.tls_handshake_errors,
            ),
            (
                "pigeon_relay_tls_reloads_total",
                "Times the TLS certificate, key or client CA was loaded again after a change.",
                &self.tls_reloads,
            ),
            (
                "pigeon_relay_tls_reload_errors_total",
                "Changed TLS files that could not be loaded (the previous ones stay in use).",
                &self.tls_reload_errors,
            ),
        ] {
            counter(out, name, help, v.load(Relaxed));
        }
        gauge(
            out,
            "pigeon_relay_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate the relay serves, in Unix seconds (0 without [tls]).",
            self.tls_cert_not_after.load(Relaxed),
        );
    }

    /// Admission, body deadlines, connections, malformed requests.
    fn render_admission(&self, out: &mut String) {
        labelled(
            out,
            "pigeon_relay_admission_refused_total",
            "Requests refused before their body was read, by the limit that was reached: the relay's (requests, uploads, buffered_bytes: 503) or one gateway's share (requests_per_gateway, buffered_bytes_per_gateway: 429).",
            "limit",
            ADMISSION_LIMITS.iter().zip(&self.admission_refused),
        );
        gauge(
            out,
            "pigeon_relay_buffered_body_bytes",
            "Bytes of request bodies held in memory now (limits.max_buffered_bytes).",
            self.buffered_body_bytes.load(Relaxed),
        );
        labelled(
            out,
            "pigeon_relay_request_body_timeouts_total",
            "Request bodies stopped (answered 408) because no byte came for limits.body_idle_timeout (idle) or the whole body took longer than limits.body_timeout (total).",
            "deadline",
            BODY_DEADLINES.iter().zip(&self.body_timeouts),
        );
        gauge(
            out,
            "pigeon_relay_open_connections",
            "Client connections open now (limits.max_connections).",
            self.open_connections.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_connection_limit_reached_total",
            "Times every connection slot (limits.max_connections) was taken and new connections waited in the listen queue.",
            self.connection_limit_reached.load(Relaxed),
        );
        counter(
            out,
            "pigeon_relay_malformed_requests_total",
            "Requests that were not valid HTTP/1.1 (a malformed request line or header, headers too large), answered 400 or 431 and the connection closed; the debug log names the peer and the fault.",
            self.malformed_requests.load(Relaxed),
        );
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// A counter with one label, a sample per value.
fn labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: impl Iterator<Item = (&'a &'a str, &'a AtomicU64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, c) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {}", c.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.count_request(200);
        m.count_request(200);
        m.count_request(413);
        m.count_request(418);
        m.events_accepted.fetch_add(20, Relaxed);
        m.uploads_duplicate.fetch_add(3, Relaxed);
        m.uploads_in_progress.fetch_add(2, Relaxed);
        m.sink_commit_seconds.observe(Duration::from_micros(300));
        m.sink_commit_seconds.observe(Duration::from_millis(20));
        m.count_admission_refused("requests_per_gateway");
        m.count_admission_refused("no such limit");
        m.count_body_timeout("idle");
        m.buffered_body_bytes.store(4096, Relaxed);
        let text = m.render();
        for expected in [
            "pigeon_relay_ingest_requests_total{code=\"200\"} 2",
            "pigeon_relay_ingest_requests_total{code=\"413\"} 1",
            "pigeon_relay_ingest_requests_total{code=\"other\"} 1",
            "pigeon_relay_ingest_events_total{result=\"accepted\"} 20",
            "pigeon_relay_sink_write_seconds_bucket{le=\"0.00025\"} 0",
            "pigeon_relay_sink_write_seconds_bucket{le=\"0.0005\"} 1",
            "pigeon_relay_sink_write_seconds_bucket{le=\"0.025\"} 2",
            "pigeon_relay_sink_write_seconds_bucket{le=\"+Inf\"} 2",
            "pigeon_relay_sink_write_seconds_count 2",
            "# TYPE pigeon_relay_stream_bytes_written_total counter",
            "pigeon_relay_uploads_completed_total{result=\"accepted\"} 0",
            "pigeon_relay_uploads_completed_total{result=\"duplicate\"} 3",
            "# TYPE pigeon_relay_uploads_in_progress gauge",
            "pigeon_relay_uploads_in_progress 2",
            "pigeon_relay_object_bytes_written_total 0",
            "pigeon_relay_admission_refused_total{limit=\"requests_per_gateway\"} 1",
            "pigeon_relay_admission_refused_total{limit=\"buffered_bytes\"} 0",
            "pigeon_relay_buffered_body_bytes 4096",
            "pigeon_relay_request_body_timeouts_total{deadline=\"idle\"} 1",
            "pigeon_relay_request_body_timeouts_total{deadline=\"total\"} 0",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
