//! Edge rules in the gateway (docs/rules.md): what a record looks like to a rule, and
//! what a derived event looks like as an outbox record.
//!
//! The rules themselves are pure logic in `pigeon-rules`. The gateway runs them in the
//! outbox writer, inside the transaction that commits the readings: the readings, the
//! derived events and the groups' changed states are one commit (`outbox::rule_state`).
//! A crash before it loses nothing the broker does not send again, and a crash after it
//! finds the states that match what was committed.

use pigeon_cesql::{Event, Value};
use pigeon_rules::Derived;
use pigeon_shared::ce::GatewayId;

/// The CloudEvent attributes of a record as CESQL filters see them: `id`, `source`,
/// `specversion`, `type`, `subject`, `time` and `datacontenttype`. Gateway records carry
/// no extensions, so any other name is missing (a filter on it is false, see the CESQL
/// spec's missing-attribute rule).
pub(crate) struct Attributes<'a> {
    pub(crate) id: &'a str,
    pub(crate) source: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) subject: Option<&'a str>,
    pub(crate) time_us: i64,
    pub(crate) content_type: Option<&'a str>,
}

impl Event for Attributes<'_> {
    fn attribute(&self, name: &str) -> Option<Value> {
        let text = |s: &str| Some(Value::String(s.to_owned()));
        match name {
            "id" => text(self.id),
            "source" => text(self.source),
            "specversion" => text("1.0"),
            "type" => text(self.event_type),
            "subject" => self.subject.and_then(text),
            "datacontenttype" => self.content_type.and_then(text),
            "time" => chrono::DateTime::from_timestamp_micros(self.time_us)
                .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))),
            _ => None,
        }
    }
}

/// A derived event as the outbox stores it: unpacked, with its own id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DerivedRecord {
    pub(crate) id: uuid::Uuid,
    /// `/gateways/<id>/rules/<rule>`.
    pub(crate) source: String,
    pub(crate) event_type: String,
    /// The group key.
    pub(crate) subject: String,
    pub(crate) time_us: i64,
    /// JSON.
    pub(crate) data: Vec<u8>,
    pub(crate) priority: u8,
}

impl DerivedRecord {
    pub(crate) fn new(gateway: &GatewayId, d: &Derived) -> DerivedRecord {
        DerivedRecord {
            // The engine makes every id a UUID; one that were not would still get a
            // stable one.
            id: uuid::Uuid::try_parse(&d.id).unwrap_or_else(|_| {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(d.id.as_bytes());
                let mut b = [0u8; 16];
                b.copy_from_slice(&digest[..16]);
                uuid::Builder::from_custom_bytes(b).into_uuid()
            }),
            source: gateway.source(&format!("rules/{}", d.rule)),
            event_type: d.event_type.clone(),
            subject: d.subject.clone(),
            time_us: d.time_ms.saturating_mul(1000),
            data: serde_json::to_vec(&d.data).unwrap_or_default(),
            priority: d.priority,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_see_the_records_attributes() {
        let a = Attributes {
            id: "0190-x",
            source: "/gateways/pi-1/mqtt",
            event_type: "io.pigeon.mqtt.reading",
            subject: Some("org/contoso/site/berlin/b41/hvac/room4"),
            time_us: 1_764_600_000_000_000,
            content_type: Some("application/json"),
        };
        let m = |f: &str| pigeon_cesql::Expression::parse(f).unwrap().matches(&a);
        assert!(m("subject LIKE 'org/contoso/site/berlin/%/hvac/%'"));
        assert!(m(
            "type = 'io.pigeon.mqtt.reading' AND source = '/gateways/pi-1/mqtt'"
        ));
        assert!(m("time = '2025-12-01T14:40:00.000000Z'"));
        assert!(m(
            "specversion = '1.0' AND datacontenttype = 'application/json'"
        ));
        assert!(!m("subject LIKE '%/smoke/%'"));
        assert!(!m("EXISTS room"), "no extensions");
        let none = Attributes { subject: None, ..a };
        assert!(!m_on(&none, "EXISTS subject"));
    }

    fn m_on(a: &Attributes<'_>, f: &str) -> bool {
        pigeon_cesql::Expression::parse(f).unwrap().matches(a)
    }

    #[test]
    fn a_derived_event_keeps_its_id_and_names_its_rule() {
        let gw = GatewayId::new("pi-1").unwrap();
        let d = Derived {
            rule: "fire".into(),
            id: "6f1c2a9e-0b7d-8c4e-9a21-3b5d7f9e1c20".into(),
            event_type: "io.pigeon.rule.fire".into(),
            subject: "home/kitchen/smoke".into(),
            priority: 9,
            time_ms: 1_764_600_000_123,
            data: serde_json::json!({"state": "raised"}),
        };
        let r = DerivedRecord::new(&gw, &d);
        assert_eq!(r.id.to_string(), d.id);
        assert_eq!(r.source, "/gateways/pi-1/rules/fire");
        assert_eq!(r.time_us, 1_764_600_000_123_000);
        assert_eq!(r.data, br#"{"state":"raised"}"#);
        let odd = DerivedRecord::new(
            &gw,
            &Derived {
                id: "not-a-uuid".into(),
                ..d.clone()
            },
        );
        assert_eq!(
            odd.id,
            DerivedRecord::new(
                &gw,
                &Derived {
                    id: "not-a-uuid".into(),
                    ..d
                }
            )
            .id
        );
    }
}
