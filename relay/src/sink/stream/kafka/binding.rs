//! The [CloudEvents Kafka protocol binding], binary content mode, and topic names: pure
//! functions from an event's structured JSON to the parts of a Kafka record.
//!
//! * every context attribute but `datacontenttype` becomes a header `ce_<name>` holding
//!   its value as a string (extensions included; numbers and booleans in their JSON
//!   spelling);
//! * `datacontenttype` becomes the `content-type` header;
//! * the value is the data: JSON data serialized as JSON, a string with a non-JSON content
//!   type as its bytes, `data_base64` decoded; an event without data has no value;
//! * the key is the `partitionkey` extension (which also stays a header), else the
//!   `source`, so one device's events go to one partition, in order.
//!
//! [CloudEvents Kafka protocol binding]: https://github.com/cloudevents/spec/blob/main/cloudevents/bindings/kafka-protocol-binding.md

use base64::Engine as _;
use pigeon_shared::json;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The Kafka form of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The event's `type` (the topic template may use it).
    pub event_type: String,
    pub key: Vec<u8>,
    /// `(name, value)` in a fixed order: `ce_specversion`, `ce_id`, `ce_source`,
    /// `ce_type`, then the other attributes in the order the JSON has them.
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Option<Vec<u8>>,
}

/// The header prefix the binding gives context attributes.
pub const HEADER_PREFIX: &str = "ce_";
/// The extension whose value is the record key.
pub const EXT_PARTITION_KEY: &str = "partitionkey";

const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

/// Builds the record for an event's structured JSON (as the relay renders it).
pub fn record(line: &[u8]) -> Result<Record, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("the event is not UTF-8: {e}"))?;
    let members = json::members(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => "the event is not a JSON object".to_owned(),
        _ => format!("the event is not valid JSON: {e}"),
    })?;
    // `data` stays the text it is in the line: the record's value is the sender's JSON.
    let mut data: Option<&RawValue> = None;
    let mut obj = Map::with_capacity(members.len());
    for (name, value) in members {
        if name == "data" {
            data = Some(value);
            continue;
        }
        let value = serde_json::from_str::<Value>(value.get())
            .map_err(|e| format!("attribute {name} is not valid JSON: {e}"))?;
        obj.insert(name.into_owned(), value);
    }
    let content_type = match obj.shift_remove("datacontenttype") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err("datacontenttype is not a string".to_owned()),
    };
    let value = data_value(&mut obj, data, content_type.as_deref())?;

    let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(obj.len() + 1);
    for name in REQUIRED {
        match obj.shift_remove(name) {
            Some(Value::String(s)) => {
                headers.push((format!("{HEADER_PREFIX}{name}"), s.into_bytes()))
            }
            Some(_) => return Err(format!("attribute {name} is not a string")),
            None => return Err(format!("attribute {name} is missing")),
        }
    }
    let event_type = String::from_utf8_lossy(&headers[3].1).into_owned();
    let source = headers[2].1.clone();
    let mut key = None;
    for (name, v) in obj {
        let text = match v {
            Value::Null => continue,
            Value::String(s) => s,
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Array(_) | Value::Object(_) => {
                return Err(format!("attribute {name} is not a scalar"));
            }
        };
        if name == EXT_PARTITION_KEY {
            key = Some(text.clone().into_bytes());
        }
        headers.push((format!("{HEADER_PREFIX}{name}"), text.into_bytes()));
    }
    if let Some(ct) = content_type {
        headers.push(("content-type".to_owned(), ct.into_bytes()));
    }
    Ok(Record {
        event_type,
        key: key.unwrap_or(source),
        headers,
        value,
    })
}

/// Whether a content type says the data is JSON (absent means JSON in the JSON format).
fn is_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return true;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

fn data_value(
    obj: &mut Map<String, Value>,
    data: Option<&RawValue>,
    content_type: Option<&str>,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(b64) = obj.shift_remove("data_base64") {
        let Value::String(s) = b64 else {
            return Err("data_base64 is not a string".to_owned());
        };
        return base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Some)
            .map_err(|e| format!("data_base64 is not valid base64: {e}"));
    }
    Ok(match data.map(RawValue::get) {
        None | Some("null") => None,
        Some(text) if !is_json(content_type) && text.starts_with('"') => Some(
            serde_json::from_str::<String>(text)
                .map_err(|e| e.to_string())?
                .into_bytes(),
        ),
        Some(text) => Some(text.as_bytes().to_vec()),
    })
}

/// The attributes of a record read back from Kafka that the relay deduplicates on:
/// `(source, producerid, sequence)` from the `ce_` headers, if all are there.
pub fn identity<'h>(
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
) -> Option<(&'h str, &'h str, &'h str)> {
    let (mut source, mut producer, mut sequence) = (None, None, None);
    for (k, v) in headers {
        let slot = match k {
            "ce_source" => &mut source,
            "ce_producerid" => &mut producer,
            "ce_sequence" => &mut sequence,
            _ => continue,
        };
        *slot = v.and_then(|v| std::str::from_utf8(v).ok());
    }
    Some((source?, producer?, sequence?))
}

/// The structured JSON of a record read back (binary mode undone), one line without its
/// newline: `ce_` headers become attributes (as strings: the binding keeps no types, and
/// Pigeon's own extensions are strings), `content-type` becomes `datacontenttype`, and the
/// value becomes `data` — parsed when the content type is JSON (or absent), a string for
/// text, `data_base64` otherwise (and for JSON that does not parse).
pub fn structured<'h>(
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    value: Option<&[u8]>,
) -> Vec<u8> {
    let mut first: [Option<Value>; 4] = Default::default();
    let mut rest = Map::new();
    let mut content_type = None;
    for (k, v) in headers {
        let text = || Value::String(String::from_utf8_lossy(v.unwrap_or_default()).into_owned());
        if k == "content-type" {
            content_type = Some(String::from_utf8_lossy(v.unwrap_or_default()).into_owned());
        } else if let Some(attr) = k.strip_prefix(HEADER_PREFIX) {
            match REQUIRED.iter().position(|r| *r == attr) {
                Some(i) => first[i] = Some(text()),
                None if attr == "datacontenttype" || attr == "data" || attr == "data_base64" => {}
                None => {
                    rest.insert(attr.to_owned(), text());
                }
            }
        }
    }
    let mut obj = Map::with_capacity(rest.len() + 6);
    for (name, v) in REQUIRED.iter().zip(first) {
        if let Some(v) = v {
            obj.insert((*name).to_owned(), v);
        }
    }
    obj.extend(rest);
    if let Some(ct) = &content_type {
        obj.insert("datacontenttype".to_owned(), Value::String(ct.clone()));
    }
    // JSON data is spliced in as the record holds it, never parsed into a tree.
    let mut json_data = None;
    if let Some(v) = value {
        let b64 = || Value::String(base64::engine::general_purpose::STANDARD.encode(v));
        let text = std::str::from_utf8(v).ok();
        if is_json(content_type.as_deref()) {
            json_data = text.filter(|t| serde_json::from_str::<IgnoredAny>(t).is_ok());
            if json_data.is_none() {
                obj.insert("data_base64".to_owned(), b64());
            }
        } else if let (true, Some(s)) = (is_text(content_type.as_deref()), text) {
            obj.insert("data".to_owned(), Value::String(s.to_owned()));
        } else {
            obj.insert("data_base64".to_owned(), b64());
        }
    }
    // A map of JSON values always serializes.
    let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    if let Some(data) = json_data {
        json::push_member(&mut line, "data", &json::compact(data));
    }
    line
}

/// Whether a (non-JSON) content type is text, so its data reads as a string.
fn is_text(content_type: Option<&str>) -> bool {
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/") || essence == "application/xml" || essence.ends_with("+xml")
}

/// A topic name pattern: literal text with `{tenant}` (required) and `{type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Tenant,
    Type,
}

/// The longest topic name Kafka allows.
pub const MAX_TOPIC_LEN: usize = 249;

/// Whether a byte may appear in a Kafka topic name.
pub fn topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

impl TopicTemplate {
    /// Parses a template such as `pigeon.{tenant}` or `pigeon.{tenant}.{type}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("has a '{{' without its '}}' in {text:?}"))?;
                parts.push(match &after[..end] {
                    "tenant" => Part::Tenant,
                    "type" => Part::Type,
                    other => {
                        return Err(format!(
                            "uses {{{other}}}; only {{tenant}} and {{type}} can be used"
                        ));
                    }
                });
                rest = &after[end + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let lit = &rest[..end];
                if let Some(bad) = lit.bytes().find(|&b| !topic_byte(b)) {
                    return Err(format!(
                        "has {:?}, which Kafka does not allow in topic names (only A-Z a-z 0-9 . _ -)",
                        bad as char
                    ));
                }
                parts.push(Part::Literal(lit.to_owned()));
                rest = &rest[end..];
            }
        }
        if !parts.contains(&Part::Tenant) {
            return Err(format!(
                "({text:?}) must contain {{tenant}}, so each tenant's events go to its own topics"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The topic for a tenant's event of `event_type`; an error if the type makes a name
    /// Kafka does not allow.
    pub fn render(&self, tenant: &str, event_type: &str) -> Result<String, String> {
        let mut out = String::with_capacity(self.text.len() + event_type.len());
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Tenant => out.push_str(tenant),
                Part::Type => {
                    if event_type.is_empty() || !event_type.bytes().all(topic_byte) {
                        return Err(format!(
                            "type {event_type:?} cannot be part of a Kafka topic name (topic = {:?} uses {{type}}; only A-Z a-z 0-9 . _ - are allowed)",
                            self.text
                        ));
                    }
                    out.push_str(event_type);
                }
            }
        }
        if out.len() > MAX_TOPIC_LEN || out == "." || out == ".." {
            return Err(format!(
                "the topic name {out:?} is not allowed by Kafka (at most {MAX_TOPIC_LEN} bytes, not . or ..)"
            ));
        }
        Ok(out)
    }

    /// The tenants `topic` can be the topic of: every tenant name (see
    /// `config::check_tenant`) that, in the `{tenant}` place, lets the rest match. One for
    /// the usual templates; more only where a literal next to `{tenant}` can also be part
    /// of a tenant name (`{tenant}-events` and a tenant `a-b`).
    pub fn tenants_of<'t>(&self, topic: &'t str) -> Vec<&'t str> {
        fn tenant_byte(b: u8) -> bool {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
        }
        fn go<'t>(parts: &[Part], s: &'t str, tenant: Option<&'t str>, out: &mut Vec<&'t str>) {
            match parts.split_first() {
                None => {
                    if s.is_empty()
                        && let Some(t) = tenant
                        && !out.contains(&t)
                    {
                        out.push(t);
                    }
                }
                Some((Part::Literal(l), rest)) => {
                    if let Some(after) = s.strip_prefix(l.as_str()) {
                        go(rest, after, tenant, out);
                    }
                }
                Some((Part::Tenant, rest)) => {
                    let b = s.as_bytes();
                    if b.first().is_none_or(|c| !c.is_ascii_alphanumeric()) {
                        return;
                    }
                    for n in (1..=b.len().min(64)).take_while(|&n| tenant_byte(b[n - 1])) {
                        go(rest, &s[n..], Some(&s[..n]), out);
                    }
                }
                Some((Part::Type, rest)) => {
                    let b = s.as_bytes();
                    for n in (1..=b.len()).take_while(|&n| topic_byte(b[n - 1])) {
                        go(rest, &s[n..], tenant, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        go(&self.parts, topic, None, &mut out);
        out
    }

    /// A librdkafka subscription pattern (`^…`, POSIX-style) for every topic the template
    /// can render.
    pub fn subscription(&self) -> String {
        let mut re = String::from("^");
        for p in &self.parts {
            match p {
                Part::Literal(l) => {
                    for c in l.chars() {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            re.push(c);
                        } else {
                            re.push('\\');
                            re.push(c);
                        }
                    }
                }
                Part::Tenant => re.push_str("[a-z0-9][a-z0-9_-]*"),
                Part::Type => re.push_str("[A-Za-z0-9._-]+"),
            }
        }
        re.push('$');
        re
    }

    /// Whether `topic` is a name this template can render (for finding the relay's
    /// topics among a cluster's).
    pub fn matches(&self, topic: &str) -> bool {
        fn go(parts: &[Part], s: &[u8]) -> bool {
            match parts.split_first() {
                None => s.is_empty(),
                Some((Part::Literal(l), rest)) => {
                    s.starts_with(l.as_bytes()) && go(rest, &s[l.len()..])
                }
                Some((_, rest)) => (1..=s.len())
                    .take_while(|&n| topic_byte(s[n - 1]))
                    .any(|n| go(rest, &s[n..])),
            }
        }
        go(&self.parts, topic.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'r>(r: &'r Record, name: &str) -> Option<&'r str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn json_data_becomes_the_value_and_attributes_headers() {
        let line = br#"{"specversion":"1.0","id":"e1","source":"/gateways/pi-1/mqtt","type":"io.pigeon.reading","datacontenttype":"application/json","time":"2026-12-02T01:00:00Z","subject":"home/t","producerid":"p","sequence":"00000000000000000007","data":{"c":21.5}}"#;
        let r = record(line).unwrap();
        assert_eq!(r.value.as_deref(), Some(&br#"{"c":21.5}"#[..]));
        assert_eq!(r.key, b"/gateways/pi-1/mqtt");
        assert_eq!(r.event_type, "io.pigeon.reading");
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "ce_subject",
                "ce_producerid",
                "ce_sequence",
                "content-type"
            ]
        );
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(header(&r, "ce_sequence"), Some("00000000000000000007"));
        let id = identity(r.headers.iter().map(|(k, v)| (k.as_str(), Some(&v[..]))));
        assert_eq!(
            id,
            Some(("/gateways/pi-1/mqtt", "p", "00000000000000000007"))
        );
    }

    #[test]
    fn partitionkey_is_the_key_and_scalars_are_spelled_as_in_json() {
        let line = br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","partitionkey":"sensor-9","priority":7,"alarm":true,"data":"plain"}"#;
        let r = record(line).unwrap();
        assert_eq!(r.key, b"sensor-9");
        assert_eq!(header(&r, "ce_partitionkey"), Some("sensor-9"));
        assert_eq!(header(&r, "ce_priority"), Some("7"));
        assert_eq!(header(&r, "ce_alarm"), Some("true"));
        // No content type: the data is JSON, so a string is a JSON string.
        assert_eq!(r.value.as_deref(), Some(&b"\"plain\""[..]));
        assert_eq!(header(&r, "content-type"), None);
    }

    #[test]
    fn text_and_binary_data_and_no_data() {
        let text = br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","datacontenttype":"text/plain; charset=utf-8","data":"21.5 C"}"#;
        assert_eq!(record(text).unwrap().value.as_deref(), Some(&b"21.5 C"[..]));
        let bin = br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","datacontenttype":"image/jpeg","data_base64":"/9j/4A=="}"#;
        let r = record(bin).unwrap();
        assert_eq!(r.value.as_deref(), Some(&[0xff, 0xd8, 0xff, 0xe0][..]));
        assert_eq!(header(&r, "content-type"), Some("image/jpeg"));
        let cloud = br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","datacontenttype":"application/cloudevents+json","data":{"a":1}}"#;
        assert_eq!(
            record(cloud).unwrap().value.as_deref(),
            Some(&br#"{"a":1}"#[..])
        );
        let none = br#"{"specversion":"1.0","id":"e","source":"/s","type":"t"}"#;
        assert_eq!(record(none).unwrap().value, None);
    }

    #[test]
    fn malformed_events_are_errors_not_panics() {
        for (line, want) in [
            (&b"[1]"[..], "not a JSON object"),
            (b"{", "not valid JSON"),
            (
                br#"{"specversion":"1.0","id":"e","source":"/s"}"#,
                "type is missing",
            ),
            (
                br#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#,
                "id is not a string",
            ),
            (
                br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","x":{"a":1}}"#,
                "x is not a scalar",
            ),
            (
                br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","data_base64":"!!"}"#,
                "not valid base64",
            ),
        ] {
            let err = record(line).unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
        }
    }

    #[test]
    fn records_read_back_give_the_structured_event() {
        let line = r#"{"specversion":"1.0","id":"e1","source":"/gateways/pi-1/mqtt","type":"io.pigeon.reading","datacontenttype":"application/json","time":"2026-12-02T01:00:00Z","subject":"home/t","producerid":"p","sequence":"00000000000000000007","data":{"c":21.5}}"#;
        let back = |line: &str| {
            let r = record(line.as_bytes()).unwrap();
            let headers = r.headers.iter().map(|(k, v)| (k.as_str(), Some(&v[..])));
            String::from_utf8(structured(headers, r.value.as_deref())).unwrap()
        };
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(json(&back(line)), json(line));
        assert!(back(line).starts_with(r#"{"specversion":"1.0","id":"e1","source":"#));
        for same in [
            r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","datacontenttype":"text/plain; charset=utf-8","data":"21.5 C"}"#,
            r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","datacontenttype":"image/jpeg","data_base64":"/9j/4A=="}"#,
            r#"{"specversion":"1.0","id":"e","source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","data":"plain"}"#,
        ] {
            assert_eq!(back(same), same);
        }
        // Types the binding does not keep come back as strings; bytes that are not the
        // JSON their content type says come back as data_base64.
        assert_eq!(
            back(r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","priority":7}"#),
            r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","priority":"7"}"#
        );
        let odd = structured(
            [
                ("ce_id", Some(&b"e"[..])),
                ("content-type", Some(b"application/json")),
            ],
            Some(b"\xff{"),
        );
        assert_eq!(
            String::from_utf8(odd).unwrap(),
            r#"{"id":"e","datacontenttype":"application/json","data_base64":"/3s="}"#
        );
    }

    /// Issue 24.2b: JSON data becomes the record's value as the stream line holds it, and
    /// comes back from it the same (numbers beyond an f64, duplicate keys).
    #[test]
    fn issue_24_json_data_keeps_its_numbers_and_keys_through_kafka() {
        let data = r#"{"big":12345678901234567890123,"dec":0.12345678901234567891,"k":1,"k":2}"#;
        let line = format!(
            r#"{{"specversion":"1.0","id":"e","source":"/s","type":"t","datacontenttype":"application/json","data":{data}}}"#
        );
        let r = record(line.as_bytes()).unwrap();
        assert_eq!(r.value.as_deref(), Some(data.as_bytes()));
        let headers = r.headers.iter().map(|(k, v)| (k.as_str(), Some(&v[..])));
        let back = String::from_utf8(structured(headers, r.value.as_deref())).unwrap();
        assert_eq!(back, line);
        // A value with whitespace (another producer's record) is stored compacted.
        let spaced = structured(
            [
                ("ce_id", Some(&b"e"[..])),
                ("content-type", Some(b"application/json")),
            ],
            Some(b"{ \"n\" : 1.0 }\n"),
        );
        assert_eq!(
            String::from_utf8(spaced).unwrap(),
            r#"{"id":"e","datacontenttype":"application/json","data":{"n":1.0}}"#
        );
    }

    #[test]
    fn tenants_are_found_in_topic_names() {
        let t = TopicTemplate::parse("pigeon.{tenant}.{type}").unwrap();
        assert_eq!(t.tenants_of("pigeon.acme.io.pigeon.reading"), ["acme"]);
        assert_eq!(t.tenants_of("pigeon.a-b_c.x"), ["a-b_c"]);
        assert!(t.tenants_of("pigeon.Acme.x").is_empty());
        assert!(t.tenants_of("pigeon.acme").is_empty());
        assert!(t.tenants_of("other.acme.x").is_empty());
        let t = TopicTemplate::parse("{tenant}-events").unwrap();
        assert_eq!(t.tenants_of("acme-events"), ["acme"]);
        assert_eq!(t.tenants_of("a-b-events"), ["a-b"]);
        let t = TopicTemplate::parse("p-{tenant}-{type}").unwrap();
        assert_eq!(t.tenants_of("p-a-b-c"), ["a", "a-b"]);
        assert_eq!(
            TopicTemplate::parse("pigeon.{tenant}.{type}")
                .unwrap()
                .subscription(),
            r"^pigeon\.[a-z0-9][a-z0-9_-]*\.[A-Za-z0-9._-]+$"
        );
    }

    #[test]
    fn topic_templates() {
        let t = TopicTemplate::parse("pigeon.{tenant}.{type}").unwrap();
        assert_eq!(
            t.render("acme", "io.pigeon.reading").unwrap(),
            "pigeon.acme.io.pigeon.reading"
        );
        assert!(t.render("acme", "a/b").unwrap_err().contains("\"a/b\""));
        assert!(t.render("acme", &"x".repeat(250)).is_err());
        assert!(t.matches("pigeon.acme.io.pigeon.reading"));
        assert!(!t.matches("pigeon.acme"));
        assert!(!t.matches("other.acme.x"));
        let t = TopicTemplate::parse("{tenant}-events").unwrap();
        assert_eq!(t.render("acme", "any/thing").unwrap(), "acme-events");
        assert!(t.matches("acme-events") && t.matches("a.b-events"));
        assert!(!t.matches("-events") && !t.matches("acme-events2"));

        for (bad, want) in [
            ("pigeon", "must contain {tenant}"),
            ("pigeon.{type}", "must contain {tenant}"),
            ("pigeon/{tenant}", "'/'"),
            ("p.{tenant}.{gateway}", "{gateway}"),
            ("p.{tenant", "without its"),
        ] {
            let err = TopicTemplate::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
