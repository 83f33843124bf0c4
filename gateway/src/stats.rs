//! Counters the gateway's parts update and its logs, `/metrics`, `/status`, the systemd
//! status line and the heartbeat events read. Plain atomics: cheap on the hot path, no
//! locks (but for the last error, which changes rarely).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::outbox::NewRecord;

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) mqtt_connected: AtomicBool,
    /// MQTT PUBLISH packets received (including a broker's re-deliveries).
    pub(crate) mqtt_received: AtomicU64,
    /// MQTT messages dropped because they were larger than `mqtt.max_packet_size`, or
    /// their events would have been larger than `relay.max_event_bytes`.
    pub(crate) mqtt_oversized: AtomicU64,
    /// Whether the last upload attempt reached the relay (see `relay_last_attempt_unix`).
    pub(crate) relay_reachable: AtomicBool,
    /// Unix seconds of the last upload attempt, answered or not; 0 before the first.
    pub(crate) relay_last_attempt_unix: AtomicU64,
    /// Upload requests sent (first tries and retries).
    pub(crate) upload_requests: AtomicU64,
    /// Requests the relay answered with per-event results.
    pub(crate) upload_successes: AtomicU64,
    /// Requests that failed as a whole (network error, 401/403, 429, 5xx, …) and are retried.
    pub(crate) upload_failures: AtomicU64,
    /// Requests that re-sent events after a failed attempt.
    pub(crate) upload_retries: AtomicU64,
    /// Events the relay said are durable (accepted or recognised as duplicates).
    pub(crate) events_delivered: AtomicU64,
    /// Of `events_delivered`, those the relay already had.
    pub(crate) events_duplicate: AtomicU64,
    pub(crate) events_dead_lettered: AtomicU64,
    /// Request body bytes sent to the relay (compressed, as on the wire).
    pub(crate) bytes_sent: AtomicU64,
    /// Unix seconds of the last request the relay answered with results.
    pub(crate) last_upload_unix: AtomicU64,
    /// Heartbeat events committed to the outbox.
    pub(crate) heartbeats: AtomicU64,
    /// Outbox transactions committed / failed (and rolled back).
    pub(crate) outbox_commits: AtomicU64,
    pub(crate) outbox_commit_failures: AtomicU64,
    /// Records dropped unsent because their route's TTL ran out.
    pub(crate) outbox_expired: AtomicU64,
    /// Records (and files) a full outbox dropped to make room, and their bytes.
    pub(crate) outbox_dropped: AtomicU64,
    pub(crate) outbox_dropped_bytes: AtomicU64,
    /// New records and files a full outbox refused (their routes do not allow drops).
    pub(crate) outbox_refused: AtomicU64,
    /// Bytes the outbox and the spool use on disk, as the budget counts them (0 without
    /// a budget).
    pub(crate) outbox_used_bytes: AtomicU64,
    /// Whether the last outbox transaction failed.
    pub(crate) outbox_failing: AtomicBool,
    /// Files taken into the spool and committed, and their bytes.
    pub(crate) files_picked_up: AtomicU64,
    pub(crate) file_bytes_picked_up: AtomicU64,
    /// Finished files that could not be picked up (each counted once, at its first
    /// failure, and logged with its reason).
    pub(crate) file_pickup_errors: AtomicU64,
    /// Files whose pickup fails now (retried).
    pub(crate) file_pickups_failing: AtomicU64,
    /// Files in the drop directories being written, or waiting for their quiet period.
    pub(crate) files_being_written: AtomicU64,
    /// Files the relay stored (objects and events durable), and the bytes sent for
    /// files (upload bodies, so resumed uploads count only what was sent).
    pub(crate) files_delivered: AtomicU64,
    pub(crate) file_bytes_sent: AtomicU64,
    /// File uploads that continued from bytes the relay already had.
    pub(crate) file_upload_resumes: AtomicU64,
    /// File uploads in progress now.
    pub(crate) file_uploads_active: AtomicU64,
    /// Records committed, per source (registered with [`Stats::new`]).
    pub(crate) sources: Vec<SourceCounter>,
    /// Committed MQTT records per subscription, in configuration order.
    pub(crate) subscriptions: Vec<SubscriptionCounter>,
    /// Committed MQTT records on topics no configured filter matches.
    pub(crate) mqtt_unmatched: AtomicU64,
    /// Shared with the [`LastErrorLayer`] set up before the configuration was read.
    pub(crate) last_error: Arc<LastErrorSlot>,
    /// Readings the edge rules kept from the relay (acknowledged, not stored).
    pub(crate) rules_suppressed: AtomicU64,
    /// Each edge rule's figures as of the outbox writer's last round.
    pub(crate) rules: RulesFigures,
}

/// Committed records of one source.
#[derive(Debug)]
pub(crate) struct SourceCounter {
    /// Short name, e.g. `mqtt`.
    pub(crate) name: String,
    /// The CloudEvent `source` its records carry, e.g. `/gateways/pi-1/mqtt`.
    pub(crate) source: String,
    pub(crate) records: AtomicU64,
}

/// Committed records of one `[[mqtt.subscriptions]]` block.
#[derive(Debug)]
pub(crate) struct SubscriptionCounter {
    pub(crate) filter: String,
    pub(crate) event_type: String,
    pub(crate) records: AtomicU64,
}

/// The last warning or error the gateway logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LastError {
    pub(crate) unix: i64,
    pub(crate) level: &'static str,
    pub(crate) message: String,
}

/// Where the [`LastErrorLayer`] keeps the [`LastError`].
#[derive(Debug, Default)]
pub(crate) struct LastErrorSlot(Mutex<Option<LastError>>);

impl LastErrorSlot {
    pub(crate) fn set(&self, level: &'static str, message: String) {
        let e = LastError {
            unix: chrono::Utc::now().timestamp(),
            level,
            message,
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    pub(crate) fn get(&self) -> Option<LastError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Stats {
    /// Stats that count records per source (`(name, CloudEvent source)` pairs) and per
    /// MQTT subscription (`(filter, event type)` of each `[[mqtt.subscriptions]]`, in
    /// order).
    pub(crate) fn new(sources: &[(&str, String)], subscriptions: &[(&str, &str)]) -> Self {
        Stats {
            sources: sources
                .iter()
                .map(|(name, source)| SourceCounter {
                    name: (*name).to_owned(),
                    source: source.clone(),
                    records: AtomicU64::new(0),
                })
                .collect(),
            subscriptions: subscriptions
                .iter()
                .map(|(filter, event_type)| SubscriptionCounter {
                    filter: (*filter).to_owned(),
                    event_type: (*event_type).to_owned(),
                    records: AtomicU64::new(0),
                })
                .collect(),
            ..Stats::default()
        }
    }

    /// Counts a record the outbox committed: by source, and for MQTT records (those with a
    /// topic as subject, from the `mqtt` source) by the first subscription whose filter
    /// matches, the same rule that chose its event type.
    pub(crate) fn count_stored(&self, rec: &NewRecord) {
        let Some(src) = self.sources.iter().find(|s| s.source == rec.source) else {
            return;
        };
        src.records.fetch_add(1, Relaxed);
        if src.name != "mqtt" {
            return;
        }
        let Some(topic) = rec.subject.as_deref() else {
            return;
        };
        match self
            .subscriptions
            .iter()
            .find(|s| rumqttc::matches(topic, &s.filter))
        {
            Some(s) => s.records.fetch_add(1, Relaxed),
            None => self.mqtt_unmatched.fetch_add(1, Relaxed),
        };
    }

    /// Committed records of the source named `name` (0 if there is none).
    #[cfg(test)]
    pub(crate) fn source_records(&self, name: &str) -> u64 {
        self.sources
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.records.load(Relaxed))
    }

    pub(crate) fn last_error(&self) -> Option<LastError> {
        self.last_error.get()
    }
}

/// A tracing layer that keeps the last WARN or ERROR event of the gateway's own code in
/// a [`LastErrorSlot`] (the one [`Stats`] shows), for `status` and `/status` ("last error"). Events below the log filter
/// never reach it.
pub(crate) struct LastErrorLayer {
    slot: Arc<LastErrorSlot>,
}

impl LastErrorLayer {
    pub(crate) fn new(slot: Arc<LastErrorSlot>) -> Self {
        Self { slot }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LastErrorLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            _ => return,
        };
        if !meta.target().starts_with("pigeon_gateway") {
            return;
        }
        let mut v = MessageVisitor::default();
        event.record(&mut v);
        self.slot.set(level, v.finish());
    }
}

/// "Message. key=value key=value", from an event's fields, written as the log line
/// writes them: control characters escaped, so a file name or topic in a field cannot
/// break the line `status` shows it on (issue 24).
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl MessageVisitor {
    fn finish(self) -> String {
        let mut s = self.message;
        if !self.fields.is_empty() {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(self.fields.trim_start());
        }
        s
    }
}

impl tracing::field::Visit for MessageVisitor {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = pigeon_shared::escape::controls(value).into_owned();
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let out = if field.name() == "message" {
            self.message.clear();
            &mut self.message
        } else {
            self.fields.push(' ');
            &mut self.fields
        };
        let _ = pigeon_shared::escape::log_field(out, field.name(), value);
    }
}

/// One rule's figures, for status and /metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleFigures {
    pub(crate) name: String,
    pub(crate) stats: pigeon_rules::RuleStats,
}

/// The rules' figures as of the writer's last round.
#[derive(Debug, Default)]
pub(crate) struct RulesFigures(Mutex<Vec<RuleFigures>>);

impl RulesFigures {
    pub(crate) fn get(&self) -> Vec<RuleFigures> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set<'a>(&self, stats: impl Iterator<Item = (&'a str, pigeon_rules::RuleStats)>) {
        let figures = stats
            .map(|(name, stats)| RuleFigures {
                name: name.to_owned(),
                stats,
            })
            .collect();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = figures;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn record(source: &str, topic: Option<&str>) -> NewRecord {
        NewRecord {
            expires_us: None,
            source: source.into(),
            event_type: "t".into(),
            subject: topic.map(Into::into),
            time_us: 0,
            content_type: None,
            data: bytes::Bytes::new(),
            delivery: None,
            file: None,
            policy: crate::outbox::Policy::default(),
        }
    }

    #[test]
    fn records_are_counted_by_source_and_first_matching_subscription() {
        let stats = Stats::new(
            &[
                ("mqtt", "/gateways/g/mqtt".into()),
                ("health", "/gateways/g/health".into()),
            ],
            &[("org/+/alarms/#", "alarm"), ("org/#", "reading")],
        );
        stats.count_stored(&record("/gateways/g/mqtt", Some("org/a/alarms/smoke")));
        stats.count_stored(&record("/gateways/g/mqtt", Some("org/a/room/1")));
        stats.count_stored(&record("/gateways/g/mqtt", Some("org/b/room/2")));
        stats.count_stored(&record("/gateways/g/mqtt", Some("elsewhere")));
        stats.count_stored(&record("/gateways/g/health", None));
        stats.count_stored(&record("/gateways/other/x", None));
        assert_eq!(stats.source_records("mqtt"), 4);
        assert_eq!(stats.source_records("health"), 1);
        assert_eq!(stats.source_records("ftp"), 0);
        let per: Vec<u64> = stats
            .subscriptions
            .iter()
            .map(|s| s.records.load(Relaxed))
            .collect();
        assert_eq!(per, [1, 2]);
        assert_eq!(stats.mqtt_unmatched.load(Relaxed), 1);
    }

    #[test]
    fn the_last_warning_of_the_gateway_is_kept_with_its_fields() {
        let stats = Stats::default();
        let subscriber =
            tracing_subscriber::registry().with(LastErrorLayer::new(stats.last_error.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("Fine.");
            assert_eq!(stats.last_error(), None, "info is not an error");
            tracing::warn!(retry_in = ?std::time::Duration::from_secs(2), relay = %"http://r", "Cannot deliver.");
            tracing::warn!(target: "hyper", "Not ours.");
        });
        let e = stats.last_error().unwrap();
        assert_eq!(e.level, "warn");
        assert_eq!(e.message, "Cannot deliver. retry_in=2s relay=http://r");
    }

    /// A file name with a newline, logged with `%` or `?`, or in the message, stays on
    /// the one line `status` shows.
    #[test]
    fn issue_24_the_last_error_escapes_control_characters() {
        let stats = Stats::default();
        let subscriber =
            tracing_subscriber::registry().with(LastErrorLayer::new(stats.last_error.clone()));
        let name = "a\nINFO forged line.jpg";
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(file = %name, raw = name, "Cannot pick up {name}.");
        });
        let e = stats.last_error().unwrap();
        assert_eq!(
            e.message,
            r#"Cannot pick up a\nINFO forged line.jpg. file=a\nINFO forged line.jpg raw="a\nINFO forged line.jpg""#
        );
    }
}
