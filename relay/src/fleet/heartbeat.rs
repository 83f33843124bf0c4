//! pigeon-gateway's heartbeat events as the relay reads them: type
//! [`HEARTBEAT_TYPE`] from `/gateways/<id>/health`, with the Pi's and the outbox's
//! figures as JSON `data` (the gateway's `sources/health.rs` writes them;
//! `docs/operations.md` lists the fields).
//!
//! Only the fields below are kept, each optional, strings cut short: a heartbeat is data
//! from outside, and the fleet view must not hold whatever a gateway puts in one. A
//! heartbeat whose data does not read is still an accepted event; it just tells the
//! fleet view nothing.

use cloudevents::{AttributesReader, Event};
use pigeon_shared::ce::GatewayId;
use serde::{Deserialize, Serialize};

/// The CloudEvent `type` of pigeon-gateway's heartbeats.
pub const HEARTBEAT_TYPE: &str = "io.pigeon.gateway.heartbeat";

/// Longest `version` kept.
const MAX_VERSION_CHARS: usize = 64;
/// Longest `disk_path` kept.
const MAX_PATH_CHARS: usize = 256;

/// The figures of one heartbeat. Names and units are the gateway's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Figures {
    pub version: Option<String>,
    pub outbox_depth: Option<u64>,
    pub outbox_bytes: Option<u64>,
    pub outbox_oldest_age_seconds: Option<f64>,
    pub outbox_dead_letters: Option<u64>,
    pub disk_path: Option<String>,
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    pub temperature_c: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub cpu_count: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
    pub load_1m: Option<f64>,
    pub uptime_seconds: Option<u64>,
    pub process_uptime_seconds: Option<u64>,
    pub mqtt_connected: Option<bool>,
    pub relay_reachable: Option<bool>,
}

/// A heartbeat as it arrived: its `time` attribute (when the gateway took it, Unix ms)
/// and its figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub time_ms: Option<i64>,
    pub figures: Figures,
}

impl Figures {
    /// Reads a heartbeat's `data` (JSON text); `None` if it is not an object of them.
    pub fn parse(data: &str) -> Option<Self> {
        let mut f: Figures = serde_json::from_str(data).ok()?;
        cut(&mut f.version, MAX_VERSION_CHARS);
        cut(&mut f.disk_path, MAX_PATH_CHARS);
        Some(f)
    }
}

fn cut(s: &mut Option<String>, max: usize) {
    if let Some(v) = s
        && v.chars().count() > max
    {
        *v = v.chars().take(max).collect();
    }
}

/// The heartbeat this event is, if it is `gateway`'s: the heartbeat type from
/// `/gateways/<gateway>/health`, with JSON data.
pub fn heartbeat_of(event: &Event, data: Option<&str>, gateway: &GatewayId) -> Option<Heartbeat> {
    if event.ty() != HEARTBEAT_TYPE {
        return None;
    }
    let source = event.source().as_str();
    let own = source
        .strip_prefix(pigeon_shared::ce::SOURCE_PREFIX)
        .and_then(|rest| rest.strip_prefix(gateway.as_str()))
        == Some("/health");
    if !own {
        return None;
    }
    Some(Heartbeat {
        time_ms: event.time().map(|t| t.timestamp_millis()),
        figures: Figures::parse(data?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::event::AttributesWriter as _;

    /// What pigeon-gateway 0.1 sends (docs/operations.md, "Heartbeat events").
    pub(super) const SAMPLE: &str = r#"{"version":"0.1.0","cpu_percent":3.5,"cpu_count":4,
        "memory_total_bytes":1000,"memory_used_bytes":400,"memory_available_bytes":600,
        "swap_total_bytes":0,"swap_used_bytes":0,"load_1m":0.1,"load_5m":0.2,"load_15m":0.3,
        "uptime_seconds":500,"process_uptime_seconds":60,"disk_path":"/var/lib/pigeon",
        "disk_total_bytes":32000,"disk_free_bytes":16000,"temperature_c":null,
        "outbox_depth":12,"outbox_bytes":3400,"outbox_oldest_age_seconds":5.25,
        "outbox_dead_letters":1,"mqtt_connected":true,"relay_reachable":false}"#;

    #[test]
    fn reads_the_gateways_fields() {
        let f = Figures::parse(SAMPLE).unwrap();
        assert_eq!(f.version.as_deref(), Some("0.1.0"));
        assert_eq!(f.outbox_depth, Some(12));
        assert_eq!(f.outbox_oldest_age_seconds, Some(5.25));
        assert_eq!(f.outbox_dead_letters, Some(1));
        assert_eq!(f.disk_free_bytes, Some(16000));
        assert_eq!(f.temperature_c, None);
        assert_eq!(f.process_uptime_seconds, Some(60));
        assert_eq!(f.relay_reachable, Some(false));
    }

    #[test]
    fn odd_data_tells_nothing_or_is_cut() {
        assert_eq!(Figures::parse("[1,2]"), None);
        assert_eq!(Figures::parse("{\"outbox_depth\":-1}"), None);
        assert_eq!(Figures::parse("{}"), Some(Figures::default()));
        let long = format!("{{\"version\":\"{}\"}}", "v".repeat(1000));
        assert_eq!(Figures::parse(&long).unwrap().version.unwrap().len(), 64);
    }

    fn event(ty: &str, source: &str) -> Event {
        let mut e = Event::default();
        e.set_type(ty);
        e.set_source(source);
        e.set_time(Some(
            chrono::DateTime::parse_from_rfc3339("2026-03-01T08:00:00.250Z")
                .unwrap()
                .to_utc(),
        ));
        e
    }

    #[test]
    fn only_the_gateways_own_heartbeats_count() {
        let gw = GatewayId::new("pi-1").unwrap();
        let hb = heartbeat_of(
            &event(HEARTBEAT_TYPE, "/gateways/pi-1/health"),
            Some(SAMPLE),
            &gw,
        )
        .unwrap();
        assert_eq!(hb.time_ms, Some(1_772_352_000_250));
        assert_eq!(hb.figures.outbox_depth, Some(12));
        for (ty, source) in [
            ("com.example.reading", "/gateways/pi-1/health"),
            (HEARTBEAT_TYPE, "/gateways/pi-1/mqtt"),
            (HEARTBEAT_TYPE, "/gateways/pi-10/health"),
            (HEARTBEAT_TYPE, "/gateways/pi-1/health/x"),
        ] {
            assert_eq!(heartbeat_of(&event(ty, source), Some(SAMPLE), &gw), None);
        }
        assert_eq!(
            heartbeat_of(&event(HEARTBEAT_TYPE, "/gateways/pi-1/health"), None, &gw),
            None
        );
    }
}
