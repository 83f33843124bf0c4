//! Issue 24.3: the public CloudEvents conformance events (`tests/conformance/`, from the
//! cloudevents/conformance repository) sent to the real relay in all three HTTP binding
//! modes are stored as they were sent.
//!
//! Pigeon's own rules still apply, so each event's `source` becomes pi-1's
//! (`/gateways/pi-1/conformance`) and it gets `sequence` and `producerid`; everything
//! else is the conformance event's.

mod common;

use std::path::Path;

use base64::Engine as _;
use common::*;
use serde_json::{Map, Value};

/// One event of a conformance file.
#[derive(Debug, Clone)]
struct Conformance {
    file: String,
    attributes: Vec<(String, String)>,
    extensions: Vec<(String, String)>,
    transport: Vec<(String, String)>,
    data: Option<String>,
}

/// Reads the subset of YAML the conformance files use: documents split by `---`, maps by
/// indentation, plain or double-quoted scalars and `|` block scalars.
fn parse_file(path: &Path) -> Vec<Conformance> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for doc in text.split("\n---\n") {
        let lines: Vec<&str> = doc.lines().collect();
        let mut ev = Conformance {
            file: name.clone(),
            attributes: Vec::new(),
            extensions: Vec::new(),
            transport: Vec::new(),
            data: None,
        };
        let mut section = "";
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            i += 1;
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let indent = line.len() - line.trim_start().len();
            let (key, value) = line.trim().split_once(':').unwrap();
            let (key, value) = (key.trim().to_owned(), value.trim());
            let value = if value == "|" {
                // A block scalar: the lines indented deeper, each with a newline.
                let mut block = String::new();
                let mut strip = None;
                while i < lines.len() {
                    let l = lines[i];
                    let li = l.len() - l.trim_start().len();
                    if !l.trim().is_empty() && li <= indent {
                        break;
                    }
                    let s = *strip.get_or_insert(li);
                    block.push_str(l.get(s..).unwrap_or(""));
                    block.push('\n');
                    i += 1;
                }
                block
            } else {
                value.trim_matches('"').to_owned()
            };
            match (indent, key.as_str()) {
                (0, "Data") => ev.data = Some(value),
                (0, s) => {
                    section = if s == "ContextAttributes" {
                        "attr"
                    } else {
                        "transport"
                    }
                }
                (_, "Extensions") => section = "ext",
                _ => match section {
                    "attr" => ev.attributes.push((key, value)),
                    "ext" => ev.extensions.push((key, value)),
                    _ => ev.transport.push((key, value)),
                },
            }
        }
        if !ev.attributes.is_empty() {
            out.push(ev);
        }
    }
    out
}

fn all_events() -> Vec<Conformance> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut events = Vec::new();
    for f in [
        "v1.yaml",
        "v3.yaml",
        "v1.0/v1_minimum.yaml",
        "v0.3/v03_minimum.yaml",
    ] {
        events.extend(parse_file(&dir.join(f)));
    }
    events
}

const SOURCE: &str = "/gateways/pi-1/conformance";

impl Conformance {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn content_type(&self) -> Option<&str> {
        self.attr("datacontenttype")
    }

    fn is_json(&self) -> bool {
        self.content_type()
            .is_none_or(|ct| ct.split(';').next().unwrap().trim().ends_with("json"))
    }

    /// The attributes as sent (with Pigeon's source, sequence and producerid).
    fn attributes_for(&self, producer: &str, seq: u64) -> Map<String, Value> {
        let mut m = Map::new();
        for (k, v) in self.attributes.iter().chain(&self.extensions) {
            m.insert(k.clone(), Value::String(v.clone()));
        }
        m.insert("source".into(), SOURCE.into());
        m.insert(
            "sequence".into(),
            pigeon_shared::ce::format_sequence(seq).into(),
        );
        m.insert("producerid".into(), producer.into());
        m
    }

    /// Structured JSON: JSON data as JSON, other data as a string.
    fn structured(&self, producer: &str, seq: u64) -> Value {
        let mut m = self.attributes_for(producer, seq);
        if let Some(d) = &self.data {
            let data = if self.is_json() {
                serde_json::from_str(d).unwrap()
            } else {
                Value::String(d.clone())
            };
            m.insert("data".into(), data);
        }
        Value::Object(m)
    }
}

/// Percent-encodes a `ce-` header value as the HTTP binding asks (space, `"`, `%`,
/// and everything outside printable ASCII).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks the stored line against the event as sent; problems go to `out`.
fn compare(ev: &Conformance, mode: &str, stored: &Value, out: &mut Vec<String>) {
    let what = format!("{} {} ({mode})", ev.file, ev.attr("id").unwrap());
    for (k, v) in ev.attributes.iter().chain(&ev.extensions) {
        let want = if k == "source" { SOURCE } else { v.as_str() };
        let got = &stored[k.as_str()];
        let same = if k == "time" {
            let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
            got.as_str().and_then(t) == t(want)
        } else {
            got == want
        };
        if !same {
            out.push(format!("{what}: {k} is {got}, sent {want:?}"));
        }
    }
    let Some(data) = &ev.data else { return };
    match (mode, ev.content_type()) {
        // Binary mode without a content type: the body is bytes, kept byte for byte.
        // In 0.3 (which has no data_base64) as base64 data with datacontentencoding.
        ("binary", None) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(data);
            let got = if stored["specversion"] == "0.3" {
                if stored["datacontentencoding"] != "base64" {
                    out.push(format!("{what}: no datacontentencoding base64: {stored}"));
                }
                &stored["data"]
            } else {
                &stored["data_base64"]
            };
            if got != b64.as_str() {
                out.push(format!("{what}: {got} for {data:?} in {stored}"));
            }
        }
        _ if ev.is_json() => {
            let want: Value = serde_json::from_str(data).unwrap();
            if stored["data"] != want {
                out.push(format!("{what}: data {} instead of {want}", stored["data"]));
            }
        }
        _ => {
            if stored["data"] != data.as_str() {
                out.push(format!(
                    "{what}: data {} instead of {data:?}",
                    stored["data"]
                ));
            }
        }
    }
    if stored["specversion"] == "0.3" && stored.get("data_base64").is_some() {
        out.push(format!(
            "{what}: a 0.3 event has data_base64, which 0.3 does not have"
        ));
    }
}

#[test]
fn issue_24_conformance_events_are_stored_as_sent_in_every_mode() {
    let events = all_events();
    assert_eq!(events.len(), 10, "{events:#?}");
    let relay = Relay::start();
    let auth = format!("Bearer {TOKEN_1}");
    // (mode, which is also the producerid it was sent under; the event).
    let mut sent: Vec<(&str, &Conformance)> = Vec::new();

    // Batch: all of them in one request.
    let batch: Vec<Value> = (0..events.len())
        .map(|i| events[i].structured("batch", i as u64 + 1))
        .collect();
    let r = relay.post(
        &[
            ("content-type", "application/cloudevents-batch+json"),
            ("authorization", auth.as_str()),
        ],
        &serde_json::to_vec(&batch).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.statuses().iter().all(|s| s == "accepted"), "{}", r.json());
    sent.extend(events.iter().map(|e| ("batch", e)));

    for (i, ev) in events.iter().enumerate() {
        let seq = i as u64 + 1;
        let mut transport: Vec<(&str, &str)> = ev
            .transport
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        transport.push(("authorization", auth.as_str()));

        // Structured.
        let mut headers = transport.clone();
        headers.push(("content-type", "application/cloudevents+json"));
        let body = serde_json::to_vec(&ev.structured("structured", seq)).unwrap();
        let r = relay.post(&headers, &body);
        assert_eq!(r.statuses(), ["accepted"], "{}: {}", ev.file, r.json());

        // Binary.
        let attributes = ev.attributes_for("binary", seq);
        let names: Vec<(String, String)> = attributes
            .iter()
            .filter(|(k, _)| k.as_str() != "datacontenttype")
            .map(|(k, v)| (format!("ce-{k}"), percent_encode(v.as_str().unwrap())))
            .collect();
        let mut headers = transport.clone();
        headers.extend(names.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(ct) = ev.content_type() {
            headers.push(("content-type", ct));
        }
        let body = ev.data.clone().unwrap_or_default();
        let r = relay.post(&headers, body.as_bytes());
        assert_eq!(r.statuses(), ["accepted"], "{}: {}", ev.file, r.json());
        sent.push(("structured", ev));
        sent.push(("binary", ev));
    }

    let stored = relay.stream_events();
    assert_eq!(stored.len(), 3 * events.len());
    let mut problems = Vec::new();
    for &(mode, ev) in &sent {
        // (specversion, id) tells the conformance events apart.
        let id = ev.attr("id").unwrap();
        let specversion = ev.attr("specversion").unwrap();
        let Some(line) = stored
            .iter()
            .find(|s| s["producerid"] == mode && s["id"] == id && s["specversion"] == specversion)
        else {
            problems.push(format!("{} {id} ({mode}) is not in the stream", ev.file));
            continue;
        };
        compare(ev, mode, line, &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
