//! `/metrics`: a running gateway's [`StatusReport`] in the Prometheus text format
//! (version 0.0.4). docs/operations.md lists every metric and what it means.

use std::fmt::Write as _;

use crate::report::{DiskStatus, FilesStatus, LiveStatus, OutboxStatus, StatusReport};

/// Content-Type of [`render`]'s output.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes metric families into a string.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value with `\`, `"` and line feeds escaped.
pub(crate) fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The exposition of a running gateway's report (a report without `live` yields only
/// the outbox and disk gauges).
pub(crate) fn render(r: &StatusReport) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
    };
    if let Some(l) = &r.live {
        process(&mut e, &r.gateway, l);
        if let Some(connected) = l.mqtt_connected {
            mqtt(&mut e, l, connected);
        }
        outbox_counts(&mut e, l);
        uploads(&mut e, l);
        if let Some(f) = &l.files {
            files(&mut e, f);
        }
        if !l.rules.is_empty() {
            rules(&mut e, l);
        }
    }
    if let Some(o) = &r.outbox {
        outbox_depth(&mut e, o);
    }
    if let Some(d) = &r.disk {
        disk(&mut e, d);
    }
    e.out
}

const C: &str = "counter";
const G: &str = "gauge";

/// The process: who it is, since when, whether ready, records by source.
fn process(e: &mut Exposition, gateway: &str, l: &LiveStatus) {
    e.family(
        "pigeon_gateway_info",
        G,
        "Always 1; the labels name the gateway and its version.",
    );
    e.sample(
        "pigeon_gateway_info",
        &[("gateway", gateway), ("version", &l.version)],
        1,
    );
    e.one(
        "pigeon_gateway_start_time_seconds",
        G,
        "When the process started (Unix time).",
        l.started_unix,
    );
    e.one(
        "pigeon_gateway_ready",
        G,
        "1 while the gateway takes data (outbox commits, sources connected).",
        u8::from(l.ready),
    );
    let name = "pigeon_gateway_source_records_total";
    e.family(name, C, "Records committed to the outbox, by source.");
    for s in &l.sources {
        e.sample(name, &[("source", &s.name)], s.records);
    }
}

/// The MQTT source (only when it is configured).
fn mqtt(e: &mut Exposition, l: &LiveStatus, connected: bool) {
    e.one(
        "pigeon_gateway_mqtt_connected",
        G,
        "1 while connected to the MQTT broker.",
        u8::from(connected),
    );
    e.one(
        "pigeon_gateway_mqtt_messages_received_total",
        C,
        "MQTT messages received, including the broker's re-deliveries.",
        l.mqtt_received,
    );
    e.one(
        "pigeon_gateway_mqtt_oversized_total",
        C,
        "MQTT messages dropped (and acknowledged) for being larger than mqtt.max_packet_size, or with an event larger than relay.max_event_bytes.",
        l.mqtt_oversized,
    );
    let name = "pigeon_gateway_mqtt_subscription_records_total";
    e.family(
        name,
        C,
        "MQTT records committed, by the subscription whose filter matched first.",
    );
    for s in &l.subscriptions {
        e.sample(
            name,
            &[("filter", &s.filter), ("type", &s.event_type)],
            s.records,
        );
    }
    e.one(
        "pigeon_gateway_mqtt_unmatched_records_total",
        C,
        "MQTT records committed whose topic no configured filter matches.",
        l.mqtt_unmatched,
    );
}

/// The edge rules (only when some are configured), labelled by rule name.
fn rules(e: &mut Exposition, l: &LiveStatus) {
    type Figure = fn(&crate::report::RuleStatus) -> u64;
    let families: [(&str, &str, &str, Figure); 8] = [
        (
            "pigeon_gateway_rule_readings_evaluated_total",
            C,
            "Readings the rule's filter was evaluated on.",
            |r| r.evaluated,
        ),
        (
            "pigeon_gateway_rule_readings_matched_total",
            C,
            "Readings that passed the rule's filter.",
            |r| r.matched,
        ),
        (
            "pigeon_gateway_rule_events_total",
            C,
            "Events the rule derived.",
            |r| r.emitted,
        ),
        (
            "pigeon_gateway_rule_readings_unreadable_total",
            C,
            "Matching readings without a usable value, time or group (value, time, group_by).",
            |r| r.unreadable,
        ),
        (
            "pigeon_gateway_rule_readings_late_total",
            C,
            "Readings that came after their window closed (allowed_lateness).",
            |r| r.late,
        ),
        (
            "pigeon_gateway_rule_groups_evicted_total",
            C,
            "Groups dropped, the least recently updated first, because the rule had max_groups of them.",
            |r| r.evicted,
        ),
        (
            "pigeon_gateway_rule_groups",
            G,
            "Groups the rule keeps a state for.",
            |r| r.groups,
        ),
        (
            "pigeon_gateway_rule_active_groups",
            G,
            "Groups whose alarm is raised (threshold) or that are silent (absence).",
            |r| r.active,
        ),
    ];
    for (name, kind, help, figure) in families {
        e.family(name, kind, help);
        for r in &l.rules {
            e.sample(name, &[("rule", &r.name)], figure(r));
        }
    }
    let name = "pigeon_gateway_rule_evaluation_seconds_total";
    e.family(
        name,
        C,
        "Time spent evaluating the rule (measured on one reading in eight).",
    );
    for r in &l.rules {
        e.sample(name, &[("rule", &r.name)], r.evaluation_seconds);
    }
    e.one(
        "pigeon_gateway_rules_suppressed_readings_total",
        C,
        "Readings the rules kept from the relay (suppress, report by exception): acknowledged, not stored.",
        l.rules_suppressed,
    );
}

/// What the outbox committed, expired, dropped and refused, and its size.
fn outbox_counts(e: &mut Exposition, l: &LiveStatus) {
    e.one(
        "pigeon_gateway_outbox_commits_total",
        C,
        "Outbox transactions committed.",
        l.outbox_commits,
    );
    e.one(
        "pigeon_gateway_outbox_commit_failures_total",
        C,
        "Outbox transactions that failed and rolled back (nothing in them was acknowledged).",
        l.outbox_commit_failures,
    );
    e.one(
        "pigeon_gateway_outbox_expired_total",
        C,
        "Events dropped unsent because they waited longer than their TTL (mqtt.subscriptions.ttl).",
        l.outbox_expired,
    );
    e.one(
        "pigeon_gateway_outbox_dropped_total",
        C,
        "Events and files a full outbox dropped to make room (when_full = \"drop_oldest\"); each drop is logged with its type.",
        l.outbox_dropped,
    );
    e.one(
        "pigeon_gateway_outbox_dropped_bytes_total",
        C,
        "Bytes of what a full outbox dropped.",
        l.outbox_dropped_bytes,
    );
    e.one(
        "pigeon_gateway_outbox_refused_total",
        C,
        "New events and files a full outbox refused (when_full = \"refuse\": not acknowledged to the broker, or left in the drop directory) — counted per attempt.",
        l.outbox_refused,
    );
    e.one(
        "pigeon_gateway_outbox_used_bytes",
        G,
        "What the outbox database's pages in use and the spool's files take, as outbox.max_bytes counts it.",
        l.outbox_used_bytes,
    );
    if let Some(max) = l.outbox_max_bytes {
        e.one(
            "pigeon_gateway_outbox_max_bytes",
            G,
            "outbox.max_bytes: the most the outbox and the spool may use.",
            max,
        );
    }
}

/// The uplink: requests, bytes, what the relay answered; then the heartbeats.
fn uploads(e: &mut Exposition, l: &LiveStatus) {
    e.one(
        "pigeon_gateway_upload_requests_total",
        C,
        "Upload requests sent to the relay, retries included.",
        l.upload_requests,
    );
    e.one(
        "pigeon_gateway_upload_successes_total",
        C,
        "Upload requests the relay answered with per-event results.",
        l.upload_successes,
    );
    e.one(
        "pigeon_gateway_upload_failures_total",
        C,
        "Upload requests that failed as a whole (network, 401/403, 429, 5xx) and are retried.",
        l.upload_failures,
    );
    e.one(
        "pigeon_gateway_upload_retries_total",
        C,
        "Upload requests that re-sent events after a failed attempt.",
        l.upload_retries,
    );
    e.one(
        "pigeon_gateway_upload_bytes_total",
        C,
        "Request body bytes sent to the relay, as on the wire (compressed).",
        l.upload_bytes,
    );
    e.one(
        "pigeon_gateway_events_delivered_total",
        C,
        "Events the relay confirmed durable (duplicates included).",
        l.events_delivered,
    );
    e.one(
        "pigeon_gateway_events_duplicate_total",
        C,
        "Of the delivered events, those the relay already had.",
        l.events_duplicate,
    );
    e.one(
        "pigeon_gateway_events_dead_lettered_total",
        C,
        "Events the relay rejected, moved to the dead-letter table.",
        l.events_dead_lettered,
    );
    if let Some(reachable) = l.relay_reachable {
        e.one(
            "pigeon_gateway_relay_reachable",
            G,
            "1 if the last upload attempt reached the relay (absent before the first).",
            u8::from(reachable),
        );
    }
    e.one(
        "pigeon_gateway_last_upload_timestamp_seconds",
        G,
        "When the relay last answered an upload with results (Unix time; 0: not since the start).",
        l.last_upload_unix.unwrap_or(0),
    );
    e.one(
        "pigeon_gateway_heartbeats_total",
        C,
        "Heartbeat events committed to the outbox.",
        l.heartbeats,
    );
}

/// The files source and the file lane (only when `[files]` is configured).
fn files(e: &mut Exposition, f: &FilesStatus) {
    for (name, kind, help, v) in [
        (
            "pigeon_gateway_files_picked_up_total",
            C,
            "Files taken from the drop directories into the spool and committed.",
            f.picked_up,
        ),
        (
            "pigeon_gateway_file_bytes_picked_up_total",
            C,
            "Bytes of the files picked up.",
            f.picked_up_bytes,
        ),
        (
            "pigeon_gateway_file_pickup_errors_total",
            C,
            "Finished files whose pickup failed, each counted once (logged with the reason).",
            f.pickup_errors,
        ),
        (
            "pigeon_gateway_file_pickups_failing",
            G,
            "Files whose pickup fails now and is retried.",
            f.failing,
        ),
        (
            "pigeon_gateway_files_being_written",
            G,
            "Files in the drop directories being written now, or waiting for their quiet period.",
            f.being_written,
        ),
        (
            "pigeon_gateway_files_delivered_total",
            C,
            "Files the relay stored (object and event durable).",
            f.delivered,
        ),
        (
            "pigeon_gateway_file_bytes_sent_total",
            C,
            "File bytes sent to the relay (a resumed upload counts only what was sent again).",
            f.bytes_sent,
        ),
        (
            "pigeon_gateway_file_upload_resumes_total",
            C,
            "File uploads that continued from what the relay already had.",
            f.resumed,
        ),
        (
            "pigeon_gateway_file_uploads_active",
            G,
            "File uploads in progress.",
            f.uploading,
        ),
    ] {
        e.one(name, kind, help, v);
    }
}

/// What waits in the outbox (also without a running gateway).
fn outbox_depth(e: &mut Exposition, o: &OutboxStatus) {
    e.one(
        "pigeon_gateway_outbox_records",
        G,
        "Events waiting in the outbox to be uploaded.",
        o.waiting,
    );
    e.one(
        "pigeon_gateway_outbox_bytes",
        G,
        "Bytes waiting to be uploaded: event data, and the size of waiting files.",
        o.waiting_bytes,
    );
    e.one(
        "pigeon_gateway_outbox_oldest_age_seconds",
        G,
        "Age of the oldest waiting event (0 when none waits).",
        o.oldest_age_seconds.unwrap_or(0.0),
    );
    e.one(
        "pigeon_gateway_outbox_dead_letters",
        G,
        "Events in the dead-letter table.",
        o.dead_letters,
    );
    e.one(
        "pigeon_gateway_outbox_files",
        G,
        "Of the waiting events, files (their bytes wait in the spool).",
        o.waiting_files,
    );
    e.one(
        "pigeon_gateway_outbox_file_bytes",
        G,
        "Bytes of the waiting files.",
        o.waiting_file_bytes,
    );
}

/// The data directory's filesystem.
fn disk(e: &mut Exposition, d: &DiskStatus) {
    e.one(
        "pigeon_gateway_disk_free_bytes",
        G,
        "Space available on the filesystem holding the data directory.",
        d.free_bytes,
    );
    e.one(
        "pigeon_gateway_disk_total_bytes",
        G,
        "Size of the filesystem holding the data directory.",
        d.total_bytes,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("org/+/alarms/#"), "org/+/alarms/#");
    }

    #[test]
    fn renders_a_running_gateway() {
        let mut r = crate::report::tests::sample_report();
        if let Some(l) = &mut r.live {
            l.subscriptions[0].filter = "weird\"filter".into();
        }
        let text = render(&r);
        for expected in [
            "pigeon_gateway_info{gateway=\"pi-1\",version=\"0.1.0\"} 1",
            "# TYPE pigeon_gateway_source_records_total counter",
            "pigeon_gateway_source_records_total{source=\"mqtt\"} 10246",
            "pigeon_gateway_source_records_total{source=\"health\"} 125",
            "pigeon_gateway_mqtt_subscription_records_total{filter=\"weird\\\"filter\",type=\"com.example.alarm\"} 46",
            "pigeon_gateway_mqtt_subscription_records_total{filter=\"org/#\",type=\"com.example.reading\"} 10200",
            "pigeon_gateway_rule_readings_matched_total{rule=\"fire\"} 4100",
            "pigeon_gateway_rule_events_total{rule=\"hvac-drift\"} 31",
            "pigeon_gateway_rule_readings_late_total{rule=\"hvac-drift\"} 7",
            "pigeon_gateway_rule_active_groups{rule=\"fire\"} 1",
            "pigeon_gateway_rule_evaluation_seconds_total{rule=\"hvac-drift\"} 0.5",
            "pigeon_gateway_rules_suppressed_readings_total 5000",
            "pigeon_gateway_mqtt_connected 1",
            "pigeon_gateway_outbox_records 12",
            "pigeon_gateway_outbox_bytes 3004300",
            "pigeon_gateway_outbox_files 2",
            "pigeon_gateway_files_picked_up_total 40",
            "pigeon_gateway_file_upload_resumes_total 1",
            "# TYPE pigeon_gateway_file_uploads_active gauge",
            "pigeon_gateway_outbox_oldest_age_seconds 5",
            "pigeon_gateway_upload_failures_total 1",
            "pigeon_gateway_upload_retries_total 1",
            "pigeon_gateway_events_delivered_total 10234",
            "pigeon_gateway_events_duplicate_total 2",
            "pigeon_gateway_relay_reachable 1",
            "pigeon_gateway_last_upload_timestamp_seconds 1799999997",
            "pigeon_gateway_heartbeats_total 125",
            "pigeon_gateway_disk_free_bytes 12884901888",
            "# TYPE pigeon_gateway_outbox_records gauge",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Every family is declared once, and every sample belongs to the family above it
        // and has a number for its value.
        let mut family = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(family.clone()), "{family} declared twice");
            } else if !line.starts_with('#') {
                assert!(
                    line.starts_with(&family),
                    "{line} outside its family {family}"
                );
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn unknown_reachability_and_no_mqtt_leave_their_samples_out() {
        let mut r = crate::report::tests::sample_report();
        if let Some(l) = &mut r.live {
            l.relay_reachable = None;
            l.mqtt_connected = None;
        }
        let text = render(&r);
        assert!(!text.contains("pigeon_gateway_relay_reachable"), "{text}");
        assert!(!text.contains("pigeon_gateway_mqtt_"), "{text}");
    }
}
