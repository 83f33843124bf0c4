//! The fleet as others read it: the JSON of `GET /v1/gateways` (one [`GatewayView`]
//! per gateway) and the per-gateway series of `/metrics`. Both are drawn from the same
//! records at the moment they are asked for; neither counts anything itself.
//!
//! The JSON is shaped for a page: every field is always there (`null` when unknown),
//! times are RFC 3339 in UTC with the age the relay computed beside them (so a page
//! needs no clock of its own), and a silent gateway says why in a sentence.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat};
use serde::Serialize;

use super::heartbeat::Figures;
use super::record::{Counts, Record, RequestKind, Silence, day_of};
use super::registry::{Clock, Entry, Fleet, OTHER};

/// `GET /v1/gateways`.
#[derive(Debug, Serialize)]
pub struct FleetView {
    pub generated_at: String,
    pub relay_started_at: String,
    pub default_heartbeat_interval_seconds: f64,
    pub silent_after_intervals: u64,
    /// Gateways listed (after the operator's tenants and the query).
    pub count: usize,
    pub silent: usize,
    /// Requests of gateways that are not configured and were not tracked, because
    /// the relay tracks at most 10,000 of them.
    pub untracked: u64,
    pub gateways: Vec<GatewayView>,
}

/// One gateway (`GET /v1/gateways/<id>`, and each element of the list).
#[derive(Debug, Serialize)]
pub struct GatewayView {
    pub id: String,
    pub tenant: String,
    /// In the relay's `[[gateways]]`; `false`: it sent without a token.
    pub configured: bool,
    pub silent: bool,
    pub silent_reason: Option<String>,
    pub silence: SilenceView,
    pub first_seen: Option<String>,
    pub last_request: Option<RequestView>,
    pub last_heartbeat: Option<HeartbeatView>,
    /// Dead letters the gateway reported in its last heartbeat.
    pub dead_letters: Option<u64>,
    pub today: CountsView,
    pub total: CountsView,
}

#[derive(Debug, Serialize)]
pub struct SilenceView {
    pub heartbeat_interval_seconds: f64,
    /// `"heartbeats"`: the gap between its last two heartbeats; `"default"`:
    /// `fleet.heartbeat_interval`.
    pub heartbeat_interval_from: &'static str,
    pub silent_after_seconds: f64,
    pub quiet_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct RequestView {
    pub at: String,
    pub age_seconds: f64,
    pub kind: RequestKind,
    pub status: u16,
}

#[derive(Debug, Serialize)]
pub struct HeartbeatView {
    pub received_at: String,
    pub age_seconds: f64,
    /// Its `time` attribute: when the gateway took it.
    pub time: Option<String>,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Serialize)]
pub struct CountsView {
    /// `today`: the UTC date; `total`: absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// `total`: since when; `today`: absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    pub requests: u64,
    pub events: u64,
    pub bytes: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub files: u64,
    pub file_bytes: u64,
}

/// RFC 3339, UTC, milliseconds.
pub fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn age(now_ms: i64, at_ms: i64) -> f64 {
    seconds(u64::try_from(now_ms.saturating_sub(at_ms)).unwrap_or(0))
}

fn counts(c: Counts, date: Option<String>, since: Option<String>) -> CountsView {
    CountsView {
        date,
        since,
        requests: c.requests,
        events: c.events,
        bytes: c.bytes,
        duplicates: c.duplicates,
        rejected: c.rejected,
        files: c.files,
        file_bytes: c.file_bytes,
    }
}

impl Clock {
    fn silence(&self, r: &Record) -> Silence {
        r.silence(
            self.now_ms,
            self.listening_since_ms,
            self.default_interval_ms,
        )
    }
}

/// One gateway as the JSON shows it.
pub fn gateway_view(entry: &Entry, r: &Record, clock: &Clock) -> GatewayView {
    let now = clock.now_ms;
    let s = clock.silence(r);
    let today = DateTime::from_timestamp_millis(day_of(now) * 86_400_000)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string();
    GatewayView {
        id: entry.id.to_string(),
        tenant: entry.tenant.clone(),
        configured: entry.configured,
        silent: s.silent,
        silent_reason: s.reason,
        silence: SilenceView {
            heartbeat_interval_seconds: seconds(s.interval_ms),
            heartbeat_interval_from: if s.from_heartbeats {
                "heartbeats"
            } else {
                "default"
            },
            silent_after_seconds: seconds(s.threshold_ms),
            quiet_seconds: seconds(s.quiet_ms),
        },
        first_seen: r.first_seen_ms.map(rfc3339),
        last_request: r.last_request.map(|l| RequestView {
            at: rfc3339(l.at_ms),
            age_seconds: age(now, l.at_ms),
            kind: l.kind,
            status: l.status,
        }),
        last_heartbeat: r.last_heartbeat.as_ref().map(|h| HeartbeatView {
            received_at: rfc3339(h.received_ms),
            age_seconds: age(now, h.received_ms),
            time: h.time_ms.map(rfc3339),
            figures: h.figures.clone(),
        }),
        dead_letters: r
            .last_heartbeat
            .as_ref()
            .and_then(|h| h.figures.outbox_dead_letters),
        today: counts(r.today_at(now), Some(today), None),
        total: counts(r.total, None, Some(rfc3339(r.total_since_ms))),
    }
}

/// What `/metrics` shows of one gateway (or of the gateways folded into `_other`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Row {
    last_seen_ms: i64,
    events: u64,
    bytes: u64,
    /// 0 or 1 for one gateway; for `_other`, how many of its gateways are silent.
    silent: u64,
}

impl Row {
    fn of(r: &Record, clock: &Clock) -> Self {
        Row {
            last_seen_ms: r.last_request.map_or(0, |l| l.at_ms),
            events: r.total.events,
            bytes: r.total.bytes,
            silent: u64::from(clock.silence(r).silent),
        }
    }

    fn fold(&mut self, other: Row) {
        self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
        self.events += other.events;
        self.bytes += other.bytes;
        self.silent += other.silent;
    }
}

/// The metric families of the fleet: name, type, help.
const FAMILIES: [(&str, &str, &str); 4] = [
    (
        "pigeon_relay_gateway_last_seen_timestamp_seconds",
        "gauge",
        "When the gateway's last request came (Unix seconds; 0: never). For gateway=\"_other\", the latest of the gateways folded there.",
    ),
    (
        "pigeon_relay_gateway_events_accepted_total",
        "counter",
        "Events of the gateway accepted by the ingest endpoint (duplicates and rejected ones not counted).",
    ),
    (
        "pigeon_relay_gateway_bytes_accepted_total",
        "counter",
        "Bytes of those events as stored (their structured JSON lines).",
    ),
    (
        "pigeon_relay_gateway_silent",
        "gauge",
        "1 while nothing came from the gateway for longer than three heartbeat intervals; for gateway=\"_other\", how many of the gateways folded there are silent.",
    ),
];

/// The per-gateway series (at most `fleet.max_gateway_series` gateways, the rest summed
/// per tenant under `gateway="_other"`) and the fleet's totals, appended to `out`.
pub fn render_metrics(fleet: &Fleet, clock: &Clock, out: &mut String) {
    let mut own: Vec<(String, String, Row)> = Vec::new();
    let mut other: BTreeMap<String, Row> = BTreeMap::new();
    let (mut known, mut silent, mut folded) = (0u64, 0u64, 0u64);
    for e in fleet.entries() {
        let row = e.with_record(|r| Row::of(r, clock));
        known += 1;
        silent += row.silent;
        if e.own_series {
            own.push((e.id.to_string(), e.tenant.clone(), row));
        } else {
            folded += 1;
            other.entry(e.tenant.clone()).or_default().fold(row);
        }
    }
    let rows = own
        .iter()
        .map(|(g, t, r)| (g.as_str(), t.as_str(), r))
        .chain(other.iter().map(|(t, r)| (OTHER, t.as_str(), r)));
    let rows: Vec<_> = rows.collect();
    for (i, (name, kind, help)) in FAMILIES.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (gateway, tenant, r) in &rows {
            let labels = format!("{{gateway=\"{gateway}\",tenant=\"{tenant}\"}}");
            let _ = match i {
                0 => writeln!(out, "{name}{labels} {}", r.last_seen_ms as f64 / 1000.0),
                1 => writeln!(out, "{name}{labels} {}", r.events),
                2 => writeln!(out, "{name}{labels} {}", r.bytes),
                _ => writeln!(out, "{name}{labels} {}", r.silent),
            };
        }
    }
    for (name, kind, help, v) in [
        (
            "pigeon_relay_fleet_gateways",
            "gauge",
            "Gateways the relay knows: every configured one, and those that sent without a token.",
            known,
        ),
        (
            "pigeon_relay_fleet_gateways_silent",
            "gauge",
            "Known gateways from which nothing came for longer than three heartbeat intervals.",
            silent,
        ),
        (
            "pigeon_relay_fleet_gateways_folded",
            "gauge",
            "Gateways past fleet.max_gateway_series, whose series are summed under gateway=\"_other\".",
            folded,
        ),
        (
            "pigeon_relay_fleet_untracked_requests_total",
            "counter",
            "Requests of gateways that are not configured and were not tracked (the relay tracks at most 10,000 of them).",
            fleet.untracked(),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::config::FleetSettings;
    use crate::fleet::heartbeat::Heartbeat;
    use crate::fleet::record::Tally;
    use pigeon_shared::ce::GatewayId;

    /// 2026-03-01T00:00:00Z.
    const T0: i64 = 1_772_323_200_000;

    fn fleet(max_gateway_series: usize) -> Fleet {
        let gws: Vec<_> = ["pi-1", "pi-2", "pi-3"]
            .iter()
            .zip(["acme", "acme", "globex"])
            .map(|(g, t)| (GatewayId::new(g).unwrap(), t.to_owned()))
            .collect();
        let settings = FleetSettings {
            heartbeat_interval: std::time::Duration::from_secs(60),
            max_gateway_series,
        };
        Fleet::new(&gws, false, settings, T0, None)
    }

    fn send(f: &Fleet, g: &str, at: i64, events: u64) {
        let mut t = Tally {
            events,
            bytes: 100 * events,
            others: events,
            ..Tally::default()
        };
        t.heartbeat(Heartbeat {
            time_ms: Some(at),
            figures: Figures {
                outbox_dead_letters: Some(4),
                ..Figures::default()
            },
        });
        f.note(&GatewayId::new(g).unwrap(), at, RequestKind::Events, 200, t);
    }

    #[test]
    fn a_gateway_as_json_has_every_field() {
        let f = fleet(10);
        send(&f, "pi-1", T0 + 1_000, 3);
        let clock = f.clock(T0 + 61_500);
        let e = f.get(&GatewayId::new("pi-1").unwrap()).unwrap();
        let v = serde_json::to_value(e.with_record(|r| gateway_view(&e, r, &clock))).unwrap();
        assert_eq!(v["id"], "pi-1");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["silent"], false);
        assert_eq!(v["last_request"]["at"], "2026-03-01T00:00:01.000Z");
        assert_eq!(v["last_request"]["age_seconds"], 60.5);
        assert_eq!(v["last_request"]["kind"], "events");
        assert_eq!(v["last_heartbeat"]["outbox_dead_letters"], 4);
        assert_eq!(
            v["last_heartbeat"]["temperature_c"],
            serde_json::Value::Null
        );
        assert_eq!(v["dead_letters"], 4);
        assert_eq!(v["today"]["date"], "2026-03-01");
        assert_eq!(v["today"]["events"], 3);
        assert_eq!(v["total"]["since"], "2026-03-01T00:00:00.000Z");
        assert!(v["total"].get("date").is_none());
        assert_eq!(v["silence"]["silent_after_seconds"], 180.0);

        // A gateway that never sent, three default intervals on.
        let e = f.get(&GatewayId::new("pi-2").unwrap()).unwrap();
        let later = f.clock(T0 + 181_000);
        let v = serde_json::to_value(e.with_record(|r| gateway_view(&e, r, &later))).unwrap();
        assert_eq!(v["silent"], true);
        assert!(
            v["silent_reason"].as_str().unwrap().contains("3 m 1 s"),
            "{v}"
        );
        assert_eq!(v["last_request"], serde_json::Value::Null);
        assert_eq!(v["last_heartbeat"], serde_json::Value::Null);
        assert_eq!(v["dead_letters"], serde_json::Value::Null);
    }

    fn samples(text: &str) -> Vec<(&str, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (name, v) = l.rsplit_once(' ').unwrap();
                (name, v.parse::<f64>().unwrap())
            })
            .collect()
    }

    #[test]
    fn series_past_the_cap_are_summed_per_tenant() {
        let f = fleet(1);
        send(&f, "pi-1", T0 + 1_000, 3);
        send(&f, "pi-2", T0 + 2_000, 5);
        send(&f, "pi-3", T0 + 3_000, 7);
        let mut out = String::new();
        render_metrics(&f, &f.clock(T0 + 10_000), &mut out);
        let s = samples(&out);
        let value = |name: &str| {
            s.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no {name} in\n{out}"))
        };
        let g =
            |m: &str, gw: &str, t: &str| value(&format!("{m}{{gateway=\"{gw}\",tenant=\"{t}\"}}"));
        assert_eq!(
            g("pigeon_relay_gateway_events_accepted_total", "pi-1", "acme"),
            3.0
        );
        assert_eq!(
            g(
                "pigeon_relay_gateway_events_accepted_total",
                "_other",
                "acme"
            ),
            5.0
        );
        assert_eq!(
            g(
                "pigeon_relay_gateway_events_accepted_total",
                "_other",
                "globex"
            ),
            7.0
        );
        assert_eq!(
            g(
                "pigeon_relay_gateway_bytes_accepted_total",
                "_other",
                "globex"
            ),
            700.0
        );
        assert_eq!(
            g(
                "pigeon_relay_gateway_last_seen_timestamp_seconds",
                "pi-1",
                "acme"
            ),
            1_772_323_201.0
        );
        assert_eq!(g("pigeon_relay_gateway_silent", "_other", "acme"), 0.0);
        assert_eq!(value("pigeon_relay_fleet_gateways"), 3.0);
        assert_eq!(value("pigeon_relay_fleet_gateways_folded"), 2.0);
        assert!(!out.contains("gateway=\"pi-2\""), "{out}");
        // Each family once, with HELP and TYPE before its samples.
        for (name, kind, _) in FAMILIES {
            assert_eq!(out.matches(&format!("# TYPE {name} {kind}\n")).count(), 1);
        }

        // Silence sums under _other too: four minutes on, nothing came from anyone.
        let mut out = String::new();
        render_metrics(&f, &f.clock(T0 + 240_000), &mut out);
        assert!(
            out.contains("pigeon_relay_gateway_silent{gateway=\"_other\",tenant=\"acme\"} 1\n")
        );
        assert!(out.contains("pigeon_relay_gateway_silent{gateway=\"pi-1\",tenant=\"acme\"} 1\n"));
        assert!(out.contains("pigeon_relay_fleet_gateways_silent 3\n"));
    }
}
