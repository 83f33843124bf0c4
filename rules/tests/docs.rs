//! docs/rules.md cannot rot: every ```toml block with `[[rules]]` in it parses and checks,
//! every key the config takes is in its reference tables, and the four seed examples,
//! fed the readings the text describes, derive exactly the events it shows.

use chrono::{DateTime, SecondsFormat};
use pigeon_cesql::{Event, Value as CeValue};
use pigeon_rules::{Derived, Engine, Reading, Rule, RuleConfig};
use serde::Deserialize;
use serde_json::{Value, json};

const DOC: &str = include_str!("../../docs/rules.md");

/// The gateway the examples' derived events come from.
const GATEWAY: &str = "pi-1";

#[derive(Deserialize)]
struct RulesFile {
    rules: Vec<RuleConfig>,
}

/// The fenced code blocks of the doc: (language, text).
fn blocks() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in DOC.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "a code block is not closed");
    out
}

/// The ```toml blocks that hold `[[rules]]`, parsed.
fn rule_blocks() -> Vec<(String, Vec<RuleConfig>)> {
    blocks()
        .into_iter()
        .filter(|(lang, text)| lang == "toml" && text.contains("[[rules]]"))
        .map(|(_, text)| {
            let f: RulesFile =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\nin the block:\n{text}"));
            (text, f.rules)
        })
        .collect()
}

#[test]
fn every_rules_block_parses_and_checks() {
    let blocks = rule_blocks();
    assert!(
        blocks.len() >= 4,
        "the four seed examples at least: {}",
        blocks.len()
    );
    for (text, rules) in &blocks {
        assert!(!rules.is_empty(), "{text}");
        for r in rules {
            r.check()
                .unwrap_or_else(|e| panic!("{e}\nin the block:\n{text}"));
        }
        // The gateway refuses a name given twice.
        let mut names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), rules.len(), "a name given twice in:\n{text}");
    }
}

#[test]
fn the_default_config_comments_out_the_docs_four_examples() {
    let config = include_str!("../../gateway/src/default-config.toml");
    // Everything from the rules' introduction on, one `# ` taken off each line, as the
    // gateway's own test of the commented [files] section does.
    let start = config
        .find("# # Edge rules")
        .expect("a commented rules section in the default config");
    let text: String = config[start..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let file: RulesFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // Priority 9 is the default: the doc writes it out, the default config says so.
    let normal = |r: &RuleConfig| {
        r.check().unwrap();
        let mut r = r.clone();
        r.priority = r.priority.or(Some(9));
        format!("{r:?}")
    };
    let seeds = ["fire", "hvac-drift", "hvac-report", "silent-sensor"];
    assert_eq!(
        file.rules
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        seeds
    );
    let doc: Vec<RuleConfig> = rule_blocks().into_iter().flat_map(|(_, r)| r).collect();
    for r in &file.rules {
        let in_doc = doc.iter().find(|d| d.name == r.name).unwrap();
        assert_eq!(
            normal(r),
            normal(in_doc),
            "the default config's {:?}",
            r.name
        );
    }
}

/// The keys serde takes at `prefix` (a TOML text with `{}` where the bogus key goes),
/// read from its "unknown field" message: the list stays right as keys are added.
fn keys_of(template: &str) -> Vec<String> {
    let text = template.replace("{}", "bogus_key_for_the_doc_test = 1");
    let err = match toml::from_str::<RulesFile>(&text) {
        Ok(_) => panic!("the bogus key was taken: {text}"),
        Err(e) => e.to_string(),
    };
    let list = err
        .split_once("expected one of")
        .or_else(|| err.split_once("expected"))
        .unwrap_or_else(|| panic!("no key list in: {err}"))
        .1;
    let keys: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "no key list in: {err}");
    keys
}

#[test]
fn every_key_is_in_the_reference_tables() {
    let templates = [
        "[[rules]]\nname = \"r\"\n{}",
        "[[rules]]\nname = \"r\"\n[rules.threshold]\n{}",
        "[[rules]]\nname = \"r\"\n[rules.window]\nsize = \"1m\"\n{}",
        "[[rules]]\nname = \"r\"\n[rules.exception]\ndeadband = 1.0\n{}",
        "[[rules]]\nname = \"r\"\n[rules.absence]\nafter = \"1m\"\n{}",
    ];
    let mut missing = Vec::new();
    for t in templates {
        for key in keys_of(t) {
            if !DOC.contains(&format!("\n| `{key}` |")) {
                missing.push(key);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys without a row in docs/rules.md: {missing:?}"
    );
}

/// The rules of the doc's block whose first rule is `name`, checked.
fn seed(name: &str) -> Vec<Rule> {
    let (_, rules) = rule_blocks()
        .into_iter()
        .find(|(_, rules)| rules[0].name == name)
        .unwrap_or_else(|| panic!("no ```toml block with the rule {name:?}"));
    rules.iter().map(|r| r.check().unwrap()).collect()
}

/// An MQTT reading's attributes, as gateway/src/rules.rs gives them to filters.
struct Attributes {
    id: String,
    event_type: String,
    subject: String,
    time_ms: i64,
}

impl Event for Attributes {
    fn attribute(&self, name: &str) -> Option<CeValue> {
        let text = |s: &str| Some(CeValue::String(s.to_owned()));
        match name {
            "id" => text(&self.id),
            "source" => text(&format!("/gateways/{GATEWAY}/mqtt")),
            "specversion" => text("1.0"),
            "type" => text(&self.event_type),
            "subject" => text(&self.subject),
            "datacontenttype" => text("application/json"),
            "time" => text(&rfc3339(self.time_ms, SecondsFormat::Micros)),
            _ => None,
        }
    }
}

fn rfc3339(ms: i64, format: SecondsFormat) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(format, true)
}

/// Milliseconds since the epoch of `"21:14:05"` on the examples' day, 2026-12-07 (UTC).
fn at(hms: &str) -> i64 {
    DateTime::parse_from_rfc3339(&format!("2026-12-07T{hms}Z"))
        .unwrap()
        .timestamp_millis()
}

/// A UUIDv7-like record id for a reading received at `ms`, numbered `n` (the doc shows
/// these ids).
fn reading_id(ms: i64, n: u16) -> String {
    let h = format!("{ms:012x}");
    format!(
        "{}-{}-7{n:03x}-8{n:03x}-5e2f3a9c{n:04x}",
        &h[..8],
        &h[8..12]
    )
}

/// One MQTT reading: when it arrived, its topic and its payload.
struct Input {
    at: i64,
    topic: &'static str,
    data: Value,
}

fn input(hms: &str, topic: &'static str, data: Value) -> Input {
    Input {
        at: at(hms),
        topic,
        data,
    }
}

/// What the rules made of the inputs: the derived events (as CloudEvents), and per input
/// whether it was kept back.
struct Run {
    events: Vec<Value>,
    kept_back: Vec<bool>,
}

/// Feeds the inputs (in order) to an engine with `rules`, ticking every second of the
/// gateway's clock as the gateway does, until `until`.
fn run(rules: Vec<Rule>, inputs: &[Input], until: i64) -> Run {
    let mut engine = Engine::new(rules);
    let mut derived: Vec<Derived> = Vec::new();
    let mut kept_back = Vec::new();
    let mut clock = inputs[0].at - inputs[0].at.rem_euclid(1_000);
    for (n, i) in inputs.iter().enumerate() {
        while clock + 1_000 <= i.at {
            clock += 1_000;
            derived.extend(engine.tick(clock));
        }
        let id = reading_id(i.at, 0x1a0 + u16::try_from(n).unwrap());
        let attributes = Attributes {
            id: id.clone(),
            event_type: "io.pigeon.sensor.reading".into(),
            subject: i.topic.into(),
            time_ms: i.at,
        };
        let data = i.data.to_string();
        let out = engine.on_reading(
            &Reading {
                id: &id,
                attributes: &attributes,
                data: Some(&data),
            },
            i.at,
        );
        derived.extend(out.derived);
        kept_back.push(out.suppress);
    }
    while clock + 1_000 <= until {
        clock += 1_000;
        derived.extend(engine.tick(clock));
    }
    Run {
        events: derived.iter().map(cloud_event).collect(),
        kept_back,
    }
}

/// A derived event as the gateway makes it a CloudEvent (gateway/src/rules.rs).
fn cloud_event(d: &Derived) -> Value {
    json!({
        "specversion": "1.0",
        "id": d.id,
        "source": format!("/gateways/{GATEWAY}/rules/{}", d.rule),
        "type": d.event_type,
        "subject": d.subject,
        "time": rfc3339(d.time_ms, SecondsFormat::AutoSi),
        "datacontenttype": "application/json",
        "data": d.data,
    })
}

/// The example derived events the doc shows: its ```json blocks from a rule's source.
fn doc_events() -> Vec<Value> {
    blocks()
        .into_iter()
        .filter(|(lang, _)| lang == "json")
        .filter_map(|(_, text)| serde_json::from_str::<Value>(&text).ok())
        .filter(|v| {
            v["source"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("/gateways/{GATEWAY}/rules/")))
        })
        .collect()
}

/// `time` compared as an instant, whatever its fraction digits.
fn same_event(doc: &Value, derived: &Value) -> bool {
    let instant = |v: &Value| {
        v["time"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    };
    let without_time = |v: &Value| {
        let mut v = v.clone();
        v["time"] = Value::Null;
        v
    };
    instant(doc).is_some()
        && instant(doc) == instant(derived)
        && without_time(doc) == without_time(derived)
}

/// Asserts that the doc shows `rule`'s example event and that it is one of `events`.
fn the_doc_shows(rule: &str, events: &[Value]) {
    let source = format!("/gateways/{GATEWAY}/rules/{rule}");
    let shown: Vec<Value> = doc_events()
        .into_iter()
        .filter(|e| e["source"] == source.as_str())
        .collect();
    let derived = serde_json::to_string_pretty(events).unwrap();
    assert!(
        !shown.is_empty(),
        "docs/rules.md shows no event of {rule}; the rule derives:\n{derived}"
    );
    for e in &shown {
        assert!(
            events.iter().any(|d| same_event(e, d)),
            "docs/rules.md shows an event of {rule} it does not derive:\n{}\nit derives:\n{derived}",
            serde_json::to_string_pretty(e).unwrap()
        );
    }
}

#[test]
fn the_fire_alarm_raises_on_two_readings_and_clears_on_two() {
    let topic = "home/kitchen/smoke";
    let inputs = [
        input("21:14:00", topic, json!({"smoke": 0.08})),
        input("21:14:05", topic, json!({"smoke": 0.35})),
        input("21:14:10", topic, json!({"smoke": 0.41})),
        input("21:16:00", topic, json!({"smoke": 0.25})),
        input("21:20:00", topic, json!({"smoke": 0.18})),
        input("21:20:05", topic, json!({"smoke": 0.12})),
        // Another room's single spike raises nothing.
        input("21:20:10", "home/hall/smoke", json!({"smoke": 0.9})),
        input("21:20:15", "home/hall/smoke", json!({"smoke": 0.1})),
        // Not a smoke detector.
        input("21:20:20", "home/hall/temp", json!({"smoke": 0.9})),
    ];
    let r = run(seed("fire"), &inputs, at("21:21:00"));
    let states: Vec<(&str, &str, &str)> = r
        .events
        .iter()
        .map(|e| {
            (
                e["subject"].as_str().unwrap(),
                e["data"]["state"].as_str().unwrap(),
                e["time"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (topic, "raised", "2026-12-07T21:14:10Z"),
            (topic, "cleared", "2026-12-07T21:20:05Z"),
        ]
    );
    let raised = &r.events[0];
    assert_eq!(raised["type"], "io.pigeon.alarm.fire");
    assert_eq!(raised["data"]["value"], 0.41);
    assert_eq!(
        raised["data"]["readings"],
        json!([
            reading_id(at("21:14:05"), 0x1a1),
            reading_id(at("21:14:10"), 0x1a2)
        ])
    );
    assert!(r.kept_back.iter().all(|k| !k), "the readings go on too");
    the_doc_shows("fire", &r.events);
    // The same readings derive the same ids.
    assert_eq!(run(seed("fire"), &inputs, at("21:21:00")).events, r.events);
}

#[test]
fn hvac_drift_reports_the_window_whose_average_is_off_by_more_than_two() {
    let room4 = "org/contoso/site/berlin/b41/hvac/room4";
    let room2 = "org/contoso/site/berlin/b41/hvac/room2";
    let mut inputs = Vec::new();
    for (hms, t) in [
        ("21:10:30", 23.0),
        ("21:11:30", 23.5),
        ("21:12:30", 24.0),
        ("21:13:30", 23.5),
        ("21:14:30", 24.0),
    ] {
        inputs.push(input(hms, room4, json!({"temp": t})));
        inputs.push(input(
            &hms.replace(":30", ":40"),
            room2,
            json!({"temp": 21.2}),
        ));
    }
    // Paris is not Berlin.
    inputs.push(input(
        "21:14:50",
        "org/contoso/site/paris/b1/hvac/room1",
        json!({"temp": 30.0}),
    ));
    let r = run(seed("hvac-drift"), &inputs, at("21:16:00"));
    assert_eq!(r.events.len(), 1, "{:#?}", r.events);
    let e = &r.events[0];
    assert_eq!(e["subject"], room4);
    assert_eq!(e["time"], "2026-12-07T21:15:00Z");
    assert_eq!(e["type"], "io.pigeon.rule.hvac-drift");
    assert_eq!(
        e["data"]["window"],
        json!({"start": "2026-12-07T21:10:00.000Z", "end": "2026-12-07T21:15:00.000Z"})
    );
    assert_eq!(e["data"]["count"], 5);
    assert!((e["data"]["avg"].as_f64().unwrap() - 23.6).abs() < 1e-9);
    the_doc_shows("hvac-drift", &r.events);
}

#[test]
fn report_by_exception_sends_changes_and_a_heartbeat() {
    let room4 = "org/contoso/site/berlin/b41/hvac/room4";
    let mut inputs = vec![
        input("21:00:00", room4, json!({"temp": 21.0})),
        input("21:01:00", room4, json!({"temp": 21.2})),
        input("21:02:00", room4, json!({"temp": 21.4})),
        input("21:03:00", room4, json!({"temp": 21.6})),
    ];
    let minutes: Vec<String> = (4..=18).map(|m| format!("21:{m:02}:00")).collect();
    for hms in &minutes {
        inputs.push(input(hms, room4, json!({"temp": 21.3})));
    }
    // A reading without the value is not the rule's business.
    inputs.push(input("21:18:30", room4, json!({"humidity": 40})));
    let r = run(seed("hvac-report"), &inputs, at("21:19:00"));
    assert!(r.events.is_empty(), "{:#?}", r.events);
    let sent: Vec<usize> = (0..inputs.len()).filter(|&k| !r.kept_back[k]).collect();
    // 21:00, 21:03, 21:18 and the reading without a temperature.
    assert_eq!(sent, [0, 3, 18, 19]);
}

#[test]
fn a_silent_sensor_is_reported_once_and_back() {
    let soil = "home/garden/soil";
    let inputs = [
        input("21:00:00", soil, json!({"moisture": 31})),
        input("21:05:00", soil, json!({"moisture": 30})),
        input("21:31:07", soil, json!({"moisture": 12})),
    ];
    let r = run(seed("silent-sensor"), &inputs, at("21:35:00"));
    let states: Vec<(&str, &str, &str)> = r
        .events
        .iter()
        .map(|e| {
            (
                e["data"]["state"].as_str().unwrap(),
                e["time"].as_str().unwrap(),
                e["data"]["last_seen"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("silent", "2026-12-07T21:15:00Z", "2026-12-07T21:05:00.000Z"),
            ("back", "2026-12-07T21:31:07Z", "2026-12-07T21:05:00.000Z"),
        ]
    );
    assert!(r.events.iter().all(|e| e["subject"] == soil));
    the_doc_shows("silent-sensor", &r.events);
}
