//! Edge rules end to end: fire alarms and HVAC windows over readings from mosquitto,
//! through the gateway's outbox to the relay, while the gateway is SIGKILLed 20 times.
//! The derived events at the relay must equal, each once, those of an undisturbed run
//! beside it — and those the rules engine derives from the same readings in this test.

use std::collections::BTreeMap;

use pigeon_cesql::{Event, Value as CeValue};
use pigeon_e2e::{
    MosquittoOptions, Pipeline, Publisher, PublisherOptions, Reading, Stream, secs, wait_until,
};
use pigeon_rules::{Engine, RuleConfig};
use serde_json::{Value, json};

const RULES: &str = r#"
[[rules]]
name = "fire"
filter = "subject LIKE '%/smoke'"
value = "/smoke"
time = "/ts"
threshold = { above = 0.3, clear_below = 0.2, count = 2 }
type = "io.pigeon.alarm.fire"

[[rules]]
name = "hvac-avg"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac/%'"
value = "/temp"
time = "/ts"
window = { size = "2s" }
allowed_lateness = "10s"
priority = 7

[[rules]]
name = "hvac-drift"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac/%'"
value = "/temp"
time = "/ts"
window = { size = "4s", hop = "2s" }
when = "abs(avg - 21.0) > 2"
allowed_lateness = "10s"
"#;

/// Event time advances this much per round of readings (one per sensor).
const STEP_MS: i64 = 50;
const ROUNDS: i64 = 600;
const HVAC: u64 = 8;
const SMOKE: u64 = 4;
const KILLS: usize = 20;

fn hvac_topic(h: u64) -> String {
    format!("org/contoso/site/berlin/building/41/floor/1/room/{h}/hvac/climate")
}

fn smoke_topic(d: u64) -> String {
    format!("org/home/{d}/smoke")
}

/// 30 s of event time from `base_ms`: 8 HVAC sensors (two drifting out of 21 ± 2 °C)
/// and 4 smoke detectors whose level ramps through the alarm and back, every 50 ms.
fn readings(base_ms: i64) -> Vec<Reading> {
    let mut out = Vec::new();
    let mut n = 0;
    for round in 0..ROUNDS {
        let ts = base_ms + round * STEP_MS;
        for h in 0..HVAC {
            let temp = 21.0 + (h as f64 - 4.0) * 0.8 + (round % 10) as f64 * 0.1;
            out.push(reading(
                n,
                hvac_topic(h),
                json!({"n": n, "ts": ts, "temp": temp}),
            ));
            n += 1;
        }
        for d in 0..SMOKE {
            let smoke = 0.05 * ((round / (d as i64 + 3)) % 10) as f64;
            out.push(reading(
                n,
                smoke_topic(d),
                json!({"n": n, "ts": ts, "smoke": smoke}),
            ));
            n += 1;
        }
    }
    out
}

fn reading(n: u64, topic: String, data: Value) -> Reading {
    Reading {
        n,
        topic,
        payload: serde_json::to_vec(&data).unwrap(),
    }
}

/// A derived event as compared: the readings it names by their numbers `n` instead of
/// their CloudEvent ids (which differ between gateways).
type Derived = BTreeMap<String, Value>;

/// The derived events in `stream`, by id, each once (it panics on a duplicate).
fn derived_at_relay(stream: &Stream) -> Derived {
    let by_id: BTreeMap<&str, u64> = stream
        .events()
        .iter()
        .filter_map(|e| Some((e["id"].as_str()?, e["data"]["n"].as_u64()?)))
        .collect();
    let name = |id: &Value| -> Value {
        match id.as_str().and_then(|i| by_id.get(i)) {
            Some(n) => json!(n),
            None => json!(format!("unknown reading {id}")),
        }
    };
    let mut out = Derived::new();
    for e in stream.events() {
        let Some(rule) = e["source"]
            .as_str()
            .and_then(|s| s.strip_prefix("/gateways/pi-1/rules/"))
        else {
            continue;
        };
        let mut data = e["data"].clone();
        for key in ["first_reading", "last_reading"] {
            if let Some(v) = data.get(key).cloned() {
                data[key] = name(&v);
            }
        }
        if let Some(ids) = data.get("readings").and_then(Value::as_array).cloned() {
            data["readings"] = ids.iter().map(name).collect();
        }
        let id = e["id"].as_str().unwrap().to_owned();
        let time = e["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        let seen = json!({
            "rule": rule, "type": e["type"], "subject": e["subject"], "time": time,
            "data": data,
        });
        assert!(
            out.insert(id.clone(), seen).is_none(),
            "derived event {id} twice"
        );
    }
    out
}

struct Attrs<'a>(&'a str);

impl Event for Attrs<'_> {
    fn attribute(&self, name: &str) -> Option<CeValue> {
        (name == "subject").then(|| CeValue::String(self.0.to_owned()))
    }
}

/// What the engine derives from `readings` run straight through it (no clock: every
/// window is closed at the end), named like [`derived_at_relay`].
fn oracle(readings: &[Reading]) -> Derived {
    let file: toml::Table = toml::from_str(RULES).unwrap();
    let rules = file["rules"].as_array().unwrap().iter().map(|r| {
        let r: RuleConfig = r.clone().try_into().unwrap();
        r.check().unwrap()
    });
    let mut engine = Engine::new(rules.collect());
    let mut derived = Vec::new();
    for r in readings {
        let data = std::str::from_utf8(&r.payload).unwrap();
        let ts = serde_json::from_str::<Value>(data).unwrap()["ts"]
            .as_i64()
            .unwrap();
        let id = r.n.to_string();
        let attrs = Attrs(&r.topic);
        let reading = pigeon_rules::Reading {
            id: &id,
            attributes: &attrs,
            data: Some(data),
        };
        derived.extend(engine.on_reading(&reading, ts).derived);
    }
    derived.extend(engine.tick(i64::MAX / 4));
    let number = |v: &Value| json!(v.as_str().unwrap().parse::<u64>().unwrap());
    derived
        .into_iter()
        .map(|d| {
            let mut data = d.data.clone();
            for key in ["first_reading", "last_reading"] {
                if let Some(v) = data.get(key).cloned() {
                    data[key] = number(&v);
                }
            }
            if let Some(ids) = data.get("readings").and_then(Value::as_array).cloned() {
                data["readings"] = ids.iter().map(number).collect();
            }
            let seen = json!({
                "rule": d.rule, "type": d.event_type, "subject": d.subject, "time": d.time_ms,
                "data": data,
            });
            (d.id, seen)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_derive_the_same_events_once_through_20_gateway_sigkills() {
    let with_rules = |c: &mut pigeon_e2e::GatewayConfig| {
        let t: toml::Table = toml::from_str(RULES).unwrap();
        c.extra.extend(t);
    };
    let mut calm =
        Pipeline::start_with("rules-calm", MosquittoOptions::default(), with_rules).await;
    let mut killed =
        Pipeline::start_with("rules-killed", MosquittoOptions::default(), with_rules).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let all = readings(now_ms - now_ms % 1000);
    let count = all.len();
    let rate = ((HVAC + SMOKE) as i64 * 1000 / STEP_MS) as u32;
    let options = |p: &Pipeline| PublisherOptions {
        rate_per_sec: Some(rate),
        ..p.publisher()
    };
    let calm_pub = Publisher::spawn(calm.mosquitto.port(), all.clone(), options(&calm));
    let killed_pub = Publisher::spawn(killed.mosquitto.port(), all.clone(), options(&killed));

    // 20 kills spread over the 30 s the readings take.
    let between = std::time::Duration::from_millis((ROUNDS * STEP_MS) as u64 / (KILLS as u64 + 1));
    for _ in 0..KILLS {
        tokio::time::sleep(between).await;
        killed.gateway.proc().assert_running();
        killed.gateway.kill();
        killed.gateway.restart();
    }

    let calm_report = calm_pub.finish(secs(60)).await;
    let killed_report = killed_pub.finish(secs(60)).await;
    calm_report.assert_all_acked(count);
    killed_report.assert_all_acked(count);

    let expected = oracle(&all);
    let kinds = |d: &Derived, rule: &str| d.values().filter(|v| v["rule"] == rule).count();
    assert!(kinds(&expected, "fire") >= 8, "alarms raised and cleared");
    assert!(kinds(&expected, "hvac-avg") >= 8 * 15);
    assert!(
        kinds(&expected, "hvac-drift") >= 2 * 14,
        "two sensors drift"
    );

    // The last windows close 10 s (allowed_lateness) after their end.
    for (name, p, report) in [
        ("undisturbed", &calm, &calm_report),
        ("killed", &killed, &killed_report),
    ] {
        // Every reading once. (Not in sequence order: the derived events of priority 7
        // and 9 overtake the readings, as they should.)
        p.relay
            .wait_for_readings("n", &report.acked, secs(120))
            .await;
        let stream_dir = p.relay.stream_dir();
        let want = expected.len();
        wait_until(
            &format!("the {name} run's derived events at the relay"),
            secs(120),
            || {
                let stream = Stream::read(&stream_dir);
                async move {
                    let stream = stream?;
                    let got = derived_at_relay(&stream);
                    if got.len() >= want {
                        Ok(())
                    } else {
                        Err(format!("{} of {want}", got.len()))
                    }
                }
            },
        )
        .await;
        p.relay.wait_for_stream_quiet(secs(2)).await;
        let stream = p.relay.read_stream();
        if let Err(e) = stream.check_exactly_once("n", &report.acked) {
            panic!("{name}: {e}");
        }
        let resent: Vec<_> = stream
            .by_producer_sequence()
            .into_iter()
            .filter(|(_, events)| events.len() > 1)
            .map(|(key, _)| key)
            .collect();
        assert!(resent.is_empty(), "{name}: sequences twice: {resent:?}");
        let got = derived_at_relay(&stream);
        let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
        let differ: Vec<_> = expected
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .map(|(k, v)| format!("{k}: expected {v}, got {}", got[k]))
            .take(3)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty() && differ.is_empty(),
            "{name}: {} missing {missing:?}, {} extra {extra:?}, differing: {differ:#?}",
            missing.len(),
            extra.len()
        );
    }
    assert_eq!(killed.gateway.proc().starts(), 1 + KILLS as u32);
    calm.gateway.proc().assert_running();
}
