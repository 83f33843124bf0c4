//! `[mqtt]` configuration.

use pigeon_shared::units::{ByteSize, Duration};
use serde::Deserialize;

use super::source::UNMATCHED_TYPE;
use crate::outbox::{Policy, WhenFull};
use crate::sources::event_size::{largest_binary_event, largest_packet_within};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqttConfig {
    #[serde(default = "default_host")]
    pub(crate) host: String,
    #[serde(default = "default_port")]
    pub(crate) port: u16,
    /// Fixed client id of the persistent session; default `pigeon-<gateway id>`.
    pub(crate) client_id: Option<String>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    #[serde(default = "default_keep_alive")]
    pub(crate) keep_alive: Duration,
    /// Largest PUBLISH accepted from the broker (its remaining length: topic, packet id
    /// and payload). Its events must fit `relay.max_event_bytes`.
    #[serde(default = "default_max_packet_size")]
    pub(crate) max_packet_size: ByteSize,
    /// Messages received but not yet committed (and so not yet acknowledged). When full,
    /// the gateway stops reading from the broker, which holds the rest.
    #[serde(default = "default_max_pending")]
    pub(crate) max_pending: usize,
    /// Delay before reconnecting after the broker went away (doubles up to 30 s).
    #[serde(default = "default_reconnect_delay")]
    pub(crate) reconnect_delay: Duration,
    pub(crate) subscriptions: Vec<Subscription>,
}

/// One topic filter and how its messages become events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Subscription {
    pub(crate) filter: String,
    #[serde(default = "default_qos")]
    pub(crate) qos: u8,
    /// The CloudEvent `type` of messages matching this filter.
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    /// Time to live: a message still in the outbox this long after it arrived is dropped
    /// unsent (and counted) — for readings that are worthless when late. None: kept until
    /// delivered.
    pub(crate) ttl: Option<Duration>,
    /// 0 (least) to 9 (most important): higher drains first and is dropped last.
    #[serde(default = "default_priority")]
    pub(crate) priority: u8,
    /// What a full outbox does with these messages.
    #[serde(default)]
    pub(crate) when_full: WhenFull,
}

impl Subscription {
    /// How its messages are treated under pressure.
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            priority: self.priority,
            when_full: self.when_full,
        }
    }
}

fn default_priority() -> u8 {
    crate::outbox::DEFAULT_PRIORITY
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_packet_size() -> ByteSize {
    ByteSize::mib(1)
}
fn default_max_pending() -> usize {
    2_000
}
fn default_reconnect_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_qos() -> u8 {
    1
}

impl MqttConfig {
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.host.trim().is_empty() {
            return Err(("mqtt.host", "is empty".into()));
        }
        if self.port == 0 {
            return Err(("mqtt.port", "must be between 1 and 65535".into()));
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 128)
        {
            return Err(("mqtt.client_id", "must be 1 to 128 characters".into()));
        }
        if self.username.is_none() && self.password.is_some() {
            return Err(("mqtt.password", "is set but mqtt.username is not".into()));
        }
        let secs = self.keep_alive.get().as_secs();
        if !(5..=65_535).contains(&secs) {
            return Err(("mqtt.keep_alive", "must be between 5s and 65535s".into()));
        }
        if self.max_pending == 0 {
            return Err(("mqtt.max_pending", "must be at least 1".into()));
        }
        if self.subscriptions.is_empty() {
            return Err((
                "mqtt.subscriptions",
                "is empty: add at least one [[mqtt.subscriptions]] block, or remove [mqtt]".into(),
            ));
        }
        for s in &self.subscriptions {
            if !rumqttc::valid_filter(&s.filter) {
                return Err((
                    "mqtt.subscriptions.filter",
                    format!("{:?} is not a valid MQTT topic filter", s.filter),
                ));
            }
            if !matches!(s.qos, 1 | 2) {
                return Err((
                    "mqtt.subscriptions.qos",
                    format!(
                        "{} for {:?}: use 1 or 2 (QoS 0 cannot be acknowledged after commit, so it could lose data)",
                        s.qos, s.filter
                    ),
                ));
            }
            if s.priority > 9 {
                return Err((
                    "mqtt.subscriptions.priority",
                    format!(
                        "{} for {:?}: use 0 (least) to 9 (most important)",
                        s.priority, s.filter
                    ),
                ));
            }
            if s.event_type.trim().is_empty() {
                return Err((
                    "mqtt.subscriptions.type",
                    format!("is empty for {:?}", s.filter),
                ));
            }
            if s.ttl
                .is_some_and(|t| t.get() < std::time::Duration::from_secs(1))
            {
                return Err((
                    "mqtt.subscriptions.ttl",
                    format!(
                        "is under 1s for {:?}; leave it out to keep messages until they are delivered",
                        s.filter
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that the relay takes the event of every message `max_packet_size` lets
    /// through, the worst case being a payload that is not JSON (base64: 4 bytes for 3)
    /// under the longest event type; `max_event_bytes` is the relay's limit and `source`
    /// the messages' event source. What this cannot foresee — a topic full of characters
    /// JSON escapes (`"` takes 2 bytes, a control character 6) — is refused at ingest,
    /// where each message's event is measured exactly.
    pub(crate) fn check_relay_limit(
        &self,
        source: &str,
        max_event_bytes: ByteSize,
    ) -> Result<(), (&'static str, String)> {
        let limit = max_event_bytes.get();
        let event_type = self
            .subscriptions
            .iter()
            .map(|s| s.event_type.as_str())
            .chain([UNMATCHED_TYPE])
            .max_by_key(|t| t.len())
            .unwrap_or(UNMATCHED_TYPE);
        let largest = largest_binary_event(source, event_type, self.max_packet_size.get());
        if largest <= limit {
            return Ok(());
        }
        let Some(fits) = largest_packet_within(source, event_type, limit) else {
            return Err((
                "relay.max_event_bytes",
                format!(
                    "({max_event_bytes}) is less than the event of an empty MQTT message of type {event_type:?} ({} bytes)",
                    largest_binary_event(source, event_type, 0)
                ),
            ));
        };
        // A round figure to write down.
        let fits = if fits >= 1024 {
            fits / 1024 * 1024
        } else {
            fits
        };
        Err((
            "mqtt.max_packet_size",
            format!(
                "({}) lets through messages whose events are up to {largest} bytes ({:.1} MiB) as JSON \
                 (a payload that is not JSON travels base64-encoded, 4 bytes for 3), \
                 over relay.max_event_bytes ({max_event_bytes}), the relay's limit: \
                 lower mqtt.max_packet_size to at most {}, or raise relay.max_event_bytes \
                 together with the relay's limits.max_event_bytes",
                self.max_packet_size,
                largest as f64 / f64::from(1 << 20),
                ByteSize(fits),
            ),
        ))
    }

    /// The subscription whose filter matches `topic` first, in configuration order.
    pub(crate) fn subscription_for(&self, topic: &str) -> Option<&Subscription> {
        self.subscriptions
            .iter()
            .find(|s| rumqttc::matches(topic, &s.filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MqttConfig, String> {
        let c: MqttConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(c)
    }

    const TWO: &str = r#"
        [[subscriptions]]
        filter = "org/+/site/+/alarms/#"
        qos = 2
        type = "alarm"
        [[subscriptions]]
        filter = "org/#"
        type = "reading"
    "#;

    #[test]
    fn first_matching_subscription_wins() {
        let c = parse(TWO).unwrap();
        assert_eq!(c.subscriptions[1].qos, 1, "qos defaults to 1");
        let sub = |t| c.subscription_for(t).map(|s| s.event_type.as_str());
        assert_eq!(sub("org/contoso/site/berlin/alarms/smoke"), Some("alarm"));
        assert_eq!(
            sub("org/contoso/site/berlin/building/41/floor/3/room/4/sensors/climate"),
            Some("reading")
        );
        assert_eq!(sub("other/x"), None);
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse(&TWO.replace("qos = 2", "qos = 0")).unwrap_err();
        assert!(e.starts_with("mqtt.subscriptions.qos"), "{e}");
        let e = parse(&TWO.replace("org/#", "org/#/x")).unwrap_err();
        assert!(e.starts_with("mqtt.subscriptions.filter"), "{e}");
        let e = parse("subscriptions = []").unwrap_err();
        assert!(e.starts_with("mqtt.subscriptions"), "{e}");
        let e = parse(&format!("password = \"x\"\n{TWO}")).unwrap_err();
        assert!(e.starts_with("mqtt.password"), "{e}");
        let e = parse(&format!("port = 70000\n{TWO}")).unwrap_err();
        assert!(e.contains("port"), "{e}");
    }
}
