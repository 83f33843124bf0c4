//! The CloudEvents HTTP binding, as pure functions: no I/O, so all of it is unit-tested.
//!
//! An ingest request goes through these steps (the HTTP handler in [`crate::server`] calls
//! them in order):
//!
//! 1. [`content_encoding`] and [`detect_mode`] look at the headers only (415 if unusable);
//! 2. [`decode_body`] undoes `Content-Encoding: gzip`, stopping at a size limit so a gzip
//!    bomb costs nothing (413);
//! 3. [`parse_events`] turns the body into one `Result` per event: a body that is not a
//!    batch or an event at all is a [`RequestError`] (400), but one bad event in a batch is
//!    only a [`Rejection`] for that event;
//! 4. [`check_event`] applies Pigeon's rules (source owned by the gateway, `sequence` and
//!    `producerid` present, size limit) and renders the line the stream sink stores.

use std::borrow::Cow;
use std::io::Read;

use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};
use pigeon_shared::ce::{self, GatewayId};
use pigeon_shared::json;
use pigeon_shared::wire::{HEADER_PRODUCER_ID, HEADER_SETTLED_BELOW};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::auth::Principal;
use crate::fleet::heartbeat::{Heartbeat, heartbeat_of};
use crate::spec;

/// Longest `producerid` accepted.
pub const MAX_PRODUCER_ID_LEN: usize = 64;

/// Which CloudEvents HTTP binding mode a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/cloudevents-batch+json`: a JSON array of structured events.
    Batch,
    /// `application/cloudevents+json`: one structured event.
    Structured,
    /// `ce-*` headers carry the attributes, the body is the data.
    Binary,
}

/// The request's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// A problem with a request as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RequestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
}

/// Why one event was refused. Re-sending it unchanged will be refused again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The event's `id`, when it had a usable one.
    pub id: Option<String>,
    pub reason: String,
}

impl Rejection {
    fn new(id: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            id: id.map(str::to_owned),
            reason: reason.into(),
        }
    }
}

/// The media type of a `Content-Type` value: lowercase, without parameters.
pub(crate) fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, RequestError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| RequestError::BadRequest(format!("header {name} is not visible ASCII"))),
    }
}

/// Reads `Content-Encoding`: absent, `identity` or `gzip`; anything else is 415.
pub fn content_encoding(headers: &HeaderMap) -> Result<Encoding, RequestError> {
    let mut values = headers.get_all(CONTENT_ENCODING).iter();
    let Some(first) = values.next() else {
        return Ok(Encoding::Identity);
    };
    let unsupported = |v: &str| {
        RequestError::UnsupportedMediaType(format!(
            "unsupported Content-Encoding {v:?}: use gzip or identity"
        ))
    };
    if values.next().is_some() {
        return Err(unsupported("(more than one)"));
    }
    let v = first.to_str().map_err(|_| unsupported("(not ASCII)"))?;
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        _ => Err(unsupported(v)),
    }
}

/// Decides the binding mode from the headers.
///
/// The two CloudEvents content types win; otherwise a `ce-specversion` header means
/// binary mode; otherwise the request is not a CloudEvents request (415).
pub fn detect_mode(headers: &HeaderMap) -> Result<Mode, RequestError> {
    let ct = header_str(headers, CONTENT_TYPE.as_str())
        .map_err(|e| RequestError::UnsupportedMediaType(e.to_string()))?
        .map(media_type);
    match ct.as_deref() {
        Some(t) if t == ce::CONTENT_TYPE_BATCH => return Ok(Mode::Batch),
        Some(t) if t == ce::CONTENT_TYPE_STRUCTURED => return Ok(Mode::Structured),
        Some(t) if t.starts_with("application/cloudevents") => {
            return Err(RequestError::UnsupportedMediaType(format!(
                "unsupported event format {t:?}: use {} or {}",
                ce::CONTENT_TYPE_STRUCTURED,
                ce::CONTENT_TYPE_BATCH
            )));
        }
        _ => {}
    }
    if headers.contains_key("ce-specversion") {
        return Ok(Mode::Binary);
    }
    Err(RequestError::UnsupportedMediaType(format!(
        "{} is not a CloudEvents request: use Content-Type {} or {}, or binary mode with ce-* headers",
        match &ct {
            Some(t) => format!("Content-Type {t:?} without ce-specversion"),
            None => "a request without Content-Type or ce-specversion".to_owned(),
        },
        ce::CONTENT_TYPE_BATCH,
        ce::CONTENT_TYPE_STRUCTURED,
    )))
}

/// Undoes the content encoding, refusing output larger than `max_bytes`.
///
/// Decompression stops as soon as the limit is passed, so a small body that inflates to
/// gigabytes costs at most `max_bytes + 1` bytes of memory.
pub fn decode_body<'a>(
    encoding: Encoding,
    body: &'a [u8],
    max_bytes: u64,
) -> Result<Cow<'a, [u8]>, RequestError> {
    let too_large = || {
        RequestError::TooLarge(format!(
            "the request body is larger than {max_bytes} bytes after decompression (max_decompressed_bytes)"
        ))
    };
    match encoding {
        Encoding::Identity => {
            if body.len() as u64 > max_bytes {
                return Err(too_large());
            }
            Ok(Cow::Borrowed(body))
        }
        Encoding::Gzip => {
            let decoder = flate2::read::MultiGzDecoder::new(body);
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(1 << 20));
            decoder
                .take(max_bytes.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|e| {
                    RequestError::BadRequest(format!("the gzip-encoded body is corrupt: {e}"))
                })?;
            if out.len() as u64 > max_bytes {
                return Err(too_large());
            }
            Ok(Cow::Owned(out))
        }
    }
}

/// Parses a (decoded) body into events, one `Result` per event in the order sent.
///
/// A batch is first split into its elements without interpreting them (as raw JSON
/// text), and each element is then parsed on its own, so one bad event is only that
/// event's rejection.
pub fn parse_events(
    mode: Mode,
    headers: &HeaderMap,
    body: &[u8],
    max_events: usize,
) -> Result<Vec<Result<Parsed, Rejection>>, RequestError> {
    match mode {
        Mode::Batch => {
            let elements = split_batch(body, max_events)?;
            Ok(elements.into_iter().map(event_from_text).collect())
        }
        Mode::Structured => {
            let raw: &RawValue = serde_json::from_slice(body).map_err(|e| {
                RequestError::BadRequest(format!("the event is not valid JSON: {e}"))
            })?;
            if !raw.get().starts_with('{') {
                return Err(RequestError::BadRequest(
                    "a structured-mode body must be a JSON object".to_owned(),
                ));
            }
            Ok(vec![event_from_text(raw)])
        }
        Mode::Binary => Ok(vec![binary_event(headers, body)]),
    }
}

/// Splits a batch into its elements' raw JSON text, refusing more than `max_events`
/// before collecting them (a body of `[{},{},…]` must not become millions of results).
fn split_batch(body: &[u8], max_events: usize) -> Result<Vec<&RawValue>, RequestError> {
    use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};

    struct Limited<'c> {
        max: usize,
        exceeded: &'c std::cell::Cell<bool>,
    }
    impl<'de> DeserializeSeed<'de> for Limited<'_> {
        type Value = Vec<&'de RawValue>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Limited<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array of events")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(element) = seq.next_element::<&RawValue>()? {
                if out.len() == self.max {
                    self.exceeded.set(true);
                    return Err(A::Error::custom("too many events"));
                }
                out.push(element);
            }
            Ok(out)
        }
    }

    let exceeded = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = Limited {
        max: max_events,
        exceeded: &exceeded,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    result.map_err(|e| {
        if exceeded.get() {
            RequestError::TooLarge(format!(
                "the batch has more than {max_events} events (max_events_per_request); send smaller batches"
            ))
        } else if e.is_data() {
            RequestError::BadRequest("a batch must be a JSON array of events".to_owned())
        } else {
            RequestError::BadRequest(format!("the batch is not valid JSON: {e}"))
        }
    })
}

/// An event as received: its attributes, checked by the CloudEvents SDK, and its data as
/// the sender's JSON text (compacted, see [`pigeon_shared::json`]), never parsed into a
/// tree and written again, so numbers and duplicate keys reach the stream unchanged.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// Without `data` and `data_base64`.
    pub event: Event,
    /// `None` without data (or with `null`).
    pub data: Option<Data>,
}

/// An event's data: the JSON text of its `data` or `data_base64` member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// `data`: any JSON value.
    Json(String),
    /// `data_base64`: a JSON string of valid base64.
    Base64(String),
    /// CloudEvents 0.3's bytes: `data`, a JSON string of valid base64, with
    /// `datacontentencoding: base64` (0.3 has no `data_base64`).
    Base64In03(String),
}

impl Parsed {
    /// The event as one line of structured JSON: the attributes ([`Attributes`]), then
    /// the data.
    pub fn line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(&Attributes(&self.event))?;
        match &self.data {
            Some(Data::Json(text)) => json::push_member(&mut line, "data", text),
            Some(Data::Base64(text)) => json::push_member(&mut line, "data_base64", text),
            Some(Data::Base64In03(text)) => {
                json::push_member(&mut line, "datacontentencoding", "\"base64\"");
                json::push_member(&mut line, "data", text);
            }
            None => {}
        }
        Ok(line)
    }
}

/// An event's attributes as the stream stores them: the context attributes in the
/// SDK's order, then the extensions sorted by name.
///
/// The SDK keeps extensions in a `HashMap` and writes them in its iteration order, which
/// differs from one map to the next: the same event sent twice would be stored as two
/// different lines. Here an event always has one rendering.
pub struct Attributes<'e>(pub &'e Event);

impl serde::Serialize for Attributes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use cloudevents::event::AttributeValue as V;
        use serde::ser::SerializeMap as _;
        let mut extensions: Vec<_> = self.0.iter_extensions().collect();
        extensions.sort_unstable_by_key(|(name, _)| *name);
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in self.0.iter_attributes() {
            match value {
                V::SpecVersion(v) => map.serialize_entry(name, v.as_str())?,
                V::String(v) => map.serialize_entry(name, v)?,
                V::URI(v) => map.serialize_entry(name, v.as_str())?,
                V::URIRef(v) => map.serialize_entry(name, v)?,
                V::Time(v) => map.serialize_entry(name, v)?,
                V::Boolean(v) => map.serialize_entry(name, v)?,
                V::Integer(v) => map.serialize_entry(name, v)?,
                V::Binary(v) => map.serialize_entry(name, &BASE64_STANDARD.encode(v))?,
            }
        }
        for (name, value) in extensions {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// One structured event from its JSON text: an element of a batch, a structured-mode
/// body, or the `event` of an upload's `CreateUpload` (and of its manifest).
pub fn event_from_text(raw: &RawValue) -> Result<Parsed, Rejection> {
    let text = raw.get();
    if !text.starts_with('{') {
        return Err(Rejection::new(None, "an event must be a JSON object"));
    }
    let members = json::members(text)
        .map_err(|e| Rejection::new(None, format!("not a valid CloudEvent: {e}")))?;
    from_members(members)
}

/// An event from its members: `data` kept as text, the rest checked by the SDK.
fn from_members(members: Vec<(Cow<'_, str>, &RawValue)>) -> Result<Parsed, Rejection> {
    // Only look for the id when something is wrong, to say which event this was.
    let id =
        |members: &Map<String, Value>| members.get("id").and_then(Value::as_str).map(str::to_owned);
    let mut attributes = Map::with_capacity(members.len());
    let (mut data, mut base64): (Option<&RawValue>, Option<&RawValue>) = (None, None);
    let mut twice = None;
    for (name, value) in members {
        let slot = match name.as_ref() {
            "data" => Some(&mut data),
            "data_base64" => Some(&mut base64),
            _ => None,
        };
        if attributes.contains_key(name.as_ref()) || slot.as_ref().is_some_and(|s| s.is_some()) {
            twice.get_or_insert(name.into_owned());
            continue;
        }
        if let Some(slot) = slot {
            *slot = Some(value);
            continue;
        }
        let value = serde_json::from_str::<Value>(value.get()).map_err(|e| Rejection {
            id: None,
            reason: format!("attribute {name:?} is not valid JSON: {e}"),
        })?;
        attributes.insert(name.into_owned(), value);
    }
    if let Some(name) = twice {
        return Err(Rejection {
            id: id(&attributes),
            reason: format!("attribute {name:?} appears more than once"),
        });
    }
    fn not_null(v: Option<&RawValue>) -> Option<&str> {
        v.map(RawValue::get).filter(|t| *t != "null")
    }
    let data = match (not_null(data), not_null(base64)) {
        (Some(_), Some(_)) => {
            return Err(Rejection {
                id: id(&attributes),
                reason: "an event has either data or data_base64, not both".to_owned(),
            });
        }
        (Some(text), None) if attributes.contains_key("datacontentencoding") => {
            // 0.3's bytes; the SDK would decode them and forget the encoding.
            check_base64("data (with datacontentencoding)", text)
                .map_err(|reason| Rejection::new(id(&attributes).as_deref(), reason))?;
            Some(Data::Base64In03(text.to_owned()))
        }
        (Some(text), None) => Some(Data::Json(json::compact(text).into_owned())),
        (None, Some(text)) => {
            check_base64("data_base64", text)
                .map_err(|reason| Rejection::new(id(&attributes).as_deref(), reason))?;
            Some(Data::Base64(text.to_owned()))
        }
        (None, None) => None,
    };
    let event_id = id(&attributes);
    spec::check_attributes(&attributes).map_err(|reason| Rejection {
        id: event_id.clone(),
        reason,
    })?;
    // Written back with the data it describes (see `Data::Base64In03`).
    if attributes.shift_remove("datacontentencoding").is_some() && data.is_none() {
        return Err(Rejection {
            id: event_id,
            reason: "attribute \"datacontentencoding\" is set but the event has no data".to_owned(),
        });
    }
    let event =
        serde_json::from_value::<Event>(Value::Object(attributes)).map_err(|e| Rejection {
            id: event_id.clone(),
            reason: format!("not a valid CloudEvent: {e}"),
        })?;
    // JSON data is any JSON value; data of another media type is a string.
    if let (Some(Data::Json(d)), Some(ct)) = (&data, event.datacontenttype())
        && !is_json_media_type(ct)
        && !d.starts_with('"')
    {
        return Err(Rejection {
            id: event_id,
            reason: format!(
                "data must be a JSON string when datacontenttype ({ct:?}) is not JSON; send bytes as data_base64"
            ),
        });
    }
    Ok(Parsed { event, data })
}

/// Checks that `text` is a JSON string of base64 (RFC 4648, padded).
fn check_base64(what: &str, text: &str) -> Result<(), String> {
    serde_json::from_str::<String>(text)
        .map_err(|e| e.to_string())
        .and_then(|s| BASE64_STANDARD.decode(s).map_err(|e| e.to_string()))
        .map(drop)
        .map_err(|e| format!("{what} must be a string of base64 (RFC 4648): {e}"))
}

/// Whether a media type is JSON: `application/json`, `text/json` or `*/*+json`, in any
/// case and with any parameters.
pub(crate) fn is_json_media_type(content_type: &str) -> bool {
    let t = media_type(content_type);
    t == "application/json" || t == "text/json" || t.ends_with("+json")
}

/// Attributes that binary mode carries elsewhere than in `ce-` headers.
const NOT_IN_CE_HEADERS: [&str; 4] = [
    "data",
    "data_base64",
    "datacontenttype",
    "datacontentencoding",
];

/// Builds a binary-mode event: attributes from `ce-*` headers, data from the body.
fn binary_event(headers: &HeaderMap, body: &[u8]) -> Result<Parsed, Rejection> {
    let id = headers
        .get("ce-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| percent_decode(v).ok());
    let reject = |reason: String| Rejection {
        id: id.clone(),
        reason,
    };

    let mut map = Map::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if NOT_IN_CE_HEADERS.contains(&attr) {
            return Err(reject(format!(
                "header {name} is not allowed in binary mode (the body is the data and Content-Type its type)"
            )));
        }
        if map.contains_key(attr) {
            return Err(reject(format!("header {name} appears more than once")));
        }
        let decoded = value
            .to_str()
            .ok()
            .and_then(|v| percent_decode(v).ok())
            .ok_or_else(|| {
                reject(format!(
                    "header {name} is not a percent-encoded UTF-8 string"
                ))
            })?;
        map.insert(attr.to_owned(), Value::String(decoded));
    }

    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if let Some(ct) = content_type {
        map.insert("datacontenttype".to_owned(), Value::String(ct.to_owned()));
    }
    let mut data = None;
    if !body.is_empty() {
        let is_json = content_type.is_some_and(is_json_media_type);
        let text = std::str::from_utf8(body).ok();
        if is_json {
            // The body is the data's JSON text, kept as it is.
            data = text
                .filter(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok())
                .map(|t| Data::Json(json::compact(t).into_owned()));
        } else if content_type.is_some() {
            data = text.map(|t| Data::Json(Value::String(t.to_owned()).to_string()));
        }
        // Anything that is not JSON or text as declared is kept byte for byte: as
        // data_base64, or in 0.3 (which has no data_base64) as base64 data with
        // datacontentencoding.
        if data.is_none() {
            let b64 = Value::String(BASE64_STANDARD.encode(body)).to_string();
            data = Some(if map.get("specversion") == Some(&Value::from("0.3")) {
                Data::Base64In03(b64)
            } else {
                Data::Base64(b64)
            });
        }
    }
    spec::check_attributes(&map).map_err(reject)?;
    serde_json::from_value::<Event>(Value::Object(map))
        .map(|event| Parsed { event, data })
        .map_err(|e| reject(format!("not a valid CloudEvent: {e}")))
}

/// Undoes the percent-encoding the HTTP binding applies to `ce-` header values.
fn percent_decode(s: &str) -> Result<String, ()> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// An event that passed every check, ready for the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedEvent {
    pub id: String,
    pub gateway: GatewayId,
    pub producer: String,
    pub sequence: u64,
    /// The event as structured JSON, without a trailing newline.
    pub line: Vec<u8>,
    /// The gateway's heartbeat, if the event is one (for the fleet view).
    pub heartbeat: Option<Box<Heartbeat>>,
}

/// Applies Pigeon's rules to one parsed event and renders its stream line.
pub fn check_event(
    parsed: &Parsed,
    principal: &Principal,
    max_event_bytes: u64,
) -> Result<CheckedEvent, Rejection> {
    let event = &parsed.event;
    let id = event.id();
    let reject = |reason: String| Rejection::new(Some(id), reason);
    let source = event.source().as_str();

    let gateway = match principal {
        Principal::Gateway(gw) => {
            if !gw.owns_source(source) {
                return Err(reject(format!(
                    "source {source} does not belong to gateway {gw}"
                )));
            }
            gw.clone()
        }
        Principal::Anonymous => ce::source_gateway(source)
            .and_then(|g| GatewayId::new(g).ok())
            .ok_or_else(|| {
                reject(format!(
                    "source {source} does not name a gateway: expected {}<gateway-id>/<input>",
                    ce::SOURCE_PREFIX
                ))
            })?,
    };

    ce::check_source_segments(source).map_err(reject)?;

    let sequence = match string_extension(event, ce::EXT_SEQUENCE).map_err(reject)? {
        Some(s) => ce::parse_sequence(s)
            .map_err(|e| reject(format!("invalid extension attribute 'sequence': {e}")))?,
        None => {
            return Err(reject(
                "missing extension attribute 'sequence' (required by Pigeon for deduplication)"
                    .to_owned(),
            ));
        }
    };
    let producer = match string_extension(event, ce::EXT_PRODUCER_ID).map_err(reject)? {
        Some(p) if !p.is_empty() && p.len() <= MAX_PRODUCER_ID_LEN => p.to_owned(),
        Some(_) => {
            return Err(reject(format!(
                "extension attribute 'producerid' must be 1 to {MAX_PRODUCER_ID_LEN} bytes long"
            )));
        }
        None => {
            return Err(reject(
                "missing extension attribute 'producerid' (required by Pigeon for deduplication)"
                    .to_owned(),
            ));
        }
    };

    let line = parsed
        .line()
        .map_err(|e| reject(format!("the event cannot be serialized: {e}")))?;
    if line.len() as u64 > max_event_bytes {
        return Err(reject(format!(
            "the event is {} bytes as JSON, over the limit of {max_event_bytes} (max_event_bytes)",
            line.len()
        )));
    }

    let data = match &parsed.data {
        Some(Data::Json(text)) => Some(text.as_str()),
        _ => None,
    };
    let heartbeat = heartbeat_of(event, data, &gateway).map(Box::new);
    Ok(CheckedEvent {
        id: id.to_owned(),
        gateway,
        producer,
        sequence,
        line,
        heartbeat,
    })
}

/// A string-valued extension attribute; other value types are an error.
fn string_extension<'e>(event: &'e Event, name: &str) -> Result<Option<&'e str>, String> {
    match event.extension(name) {
        None => Ok(None),
        Some(ExtensionValue::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("extension attribute '{name}' must be a string")),
    }
}

/// The gateway's promise carried by `pigeon-settled-below` / `pigeon-producer-id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledBelowHeader {
    pub producer: String,
    pub below: u64,
}

/// Reads the settled-below headers. Both or neither must be present.
pub fn settled_below(headers: &HeaderMap) -> Result<Option<SettledBelowHeader>, RequestError> {
    let below = header_str(headers, HEADER_SETTLED_BELOW)?;
    let producer = header_str(headers, HEADER_PRODUCER_ID)?;
    match (below, producer) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(RequestError::BadRequest(format!(
            "header {HEADER_SETTLED_BELOW} needs {HEADER_PRODUCER_ID} beside it"
        ))),
        (None, Some(_)) => Err(RequestError::BadRequest(format!(
            "header {HEADER_PRODUCER_ID} needs {HEADER_SETTLED_BELOW} beside it"
        ))),
        (Some(below), Some(producer)) => {
            let below = below.trim();
            let below = below
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| below.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| {
                    RequestError::BadRequest(format!(
                        "header {HEADER_SETTLED_BELOW} must be a decimal number that fits 64 bits"
                    ))
                })?;
            let producer = producer.trim();
            if producer.is_empty() || producer.len() > MAX_PRODUCER_ID_LEN {
                return Err(RequestError::BadRequest(format!(
                    "header {HEADER_PRODUCER_ID} must be 1 to {MAX_PRODUCER_ID_LEN} bytes long"
                )));
            }
            Ok(Some(SettledBelowHeader {
                producer: producer.to_owned(),
                below,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use serde_json::json;
    use std::io::Write;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn event_json(seq: u64) -> Value {
        json!({
            "specversion": "1.0",
            "id": format!("id-{seq}"),
            "type": "sensor.reading",
            "source": "/gateways/pi-1/mqtt",
            "datacontenttype": "application/json",
            "data": {"t": 21.5},
            "sequence": ce::format_sequence(seq),
            "producerid": "p-1",
        })
    }

    fn pi1() -> Principal {
        Principal::Gateway(GatewayId::new("pi-1").unwrap())
    }

    fn event_from_value(v: &Value) -> Result<Parsed, Rejection> {
        event_from_text(&serde_json::value::to_raw_value(v).unwrap())
    }

    #[test]
    fn one_event_is_always_one_line_with_extensions_by_name() {
        let mut event = event_json(1);
        for name in ["zeta", "alpha", "mid", "beta", "omega", "kappa"] {
            event[name] = json!(name);
        }
        let body = serde_json::to_vec(&event).unwrap();
        let lines: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                let parsed = parse_events(Mode::Structured, &HeaderMap::new(), &body, 1)
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap();
                check_event(&parsed, &pi1(), u64::MAX).unwrap().line
            })
            .collect();
        // Eight parses, eight hash maps of extensions: one rendering.
        assert!(lines.windows(2).all(|w| w[0] == w[1]));
        let names: Vec<String> = json::members(std::str::from_utf8(&lines[0]).unwrap())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "specversion",
                "id",
                "type",
                "source",
                "datacontenttype",
                "alpha",
                "beta",
                "kappa",
                "mid",
                "omega",
                "producerid",
                "sequence",
                "zeta",
                "data"
            ]
        );
    }

    #[test]
    fn modes_are_detected_from_headers() {
        let m = |pairs: &[(&str, &str)]| detect_mode(&headers(pairs));
        assert_eq!(
            m(&[("content-type", "application/cloudevents-batch+json")]),
            Ok(Mode::Batch)
        );
        assert_eq!(
            m(&[(
                "content-type",
                "Application/CloudEvents+JSON; charset=utf-8"
            )]),
            Ok(Mode::Structured)
        );
        assert_eq!(
            m(&[
                ("content-type", "application/octet-stream"),
                ("ce-specversion", "1.0")
            ]),
            Ok(Mode::Binary)
        );
        assert_eq!(m(&[("ce-specversion", "1.0")]), Ok(Mode::Binary));
        for bad in [
            &[("content-type", "application/json")][..],
            &[][..],
            &[("content-type", "application/cloudevents+avro")][..],
        ] {
            let e = m(bad).unwrap_err();
            assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad:?}");
        }
    }

    #[test]
    fn content_encodings() {
        let e = |v: Option<&str>| {
            content_encoding(&headers(
                &v.map(|v| vec![("content-encoding", v)]).unwrap_or_default(),
            ))
        };
        assert_eq!(e(None), Ok(Encoding::Identity));
        assert_eq!(e(Some("identity")), Ok(Encoding::Identity));
        assert_eq!(e(Some("GZIP")), Ok(Encoding::Gzip));
        for bad in ["br", "deflate", "gzip, br"] {
            assert_eq!(
                e(Some(bad)).unwrap_err().status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{bad}"
            );
        }
    }

    #[test]
    fn gzip_bodies_are_decoded_within_the_limit() {
        let plain = b"[1,2,3]".repeat(100);
        let packed = gzip(&plain);
        let out = decode_body(Encoding::Gzip, &packed, plain.len() as u64).unwrap();
        assert_eq!(&*out, &plain[..]);
        // One byte less and it is too large.
        let e = decode_body(Encoding::Gzip, &packed, plain.len() as u64 - 1).unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Identity bodies obey the same limit.
        let e = decode_body(Encoding::Identity, &plain, 10).unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Not gzip at all.
        let e = decode_body(Encoding::Gzip, b"plain text", 1000).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        // 256 MiB of zeros compress to ~250 KiB; decoding must give up after 1 MiB.
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let err = decode_body(Encoding::Gzip, &bomb, 1 << 20).unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn a_batch_with_one_bad_event_keeps_the_good_ones() {
        let mut bad = event_json(2);
        bad.as_object_mut().unwrap().remove("type");
        let body = serde_json::to_vec(&json!([event_json(1), bad, 42, event_json(3)])).unwrap();
        let events = parse_events(Mode::Batch, &HeaderMap::new(), &body, 100).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].as_ref().unwrap().event.id(), "id-1");
        let r = events[1].as_ref().unwrap_err();
        assert_eq!(r.id.as_deref(), Some("id-2"));
        assert!(r.reason.contains("type"), "{}", r.reason);
        let r = events[2].as_ref().unwrap_err();
        assert_eq!(r.id, None);
        assert!(r.reason.contains("JSON object"), "{}", r.reason);
        assert_eq!(events[3].as_ref().unwrap().event.id(), "id-3");
    }

    #[test]
    fn bodies_that_are_not_events_are_bad_requests() {
        let h = HeaderMap::new();
        for (mode, body) in [
            (Mode::Batch, &b"{not json"[..]),
            (Mode::Batch, &b"{\"id\": 1}"[..]),
            (Mode::Structured, &b"[]"[..]),
            (Mode::Structured, &b""[..]),
        ] {
            let e = parse_events(mode, &h, body, 100).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{mode:?} {body:?}");
        }
        assert!(
            parse_events(Mode::Batch, &h, b"[]", 100)
                .unwrap()
                .is_empty(),
            "an empty batch is fine"
        );
    }

    #[test]
    fn a_batch_over_max_events_is_too_large() {
        let h = HeaderMap::new();
        assert_eq!(
            parse_events(Mode::Batch, &h, b"[{},{},{}]", 3)
                .unwrap()
                .len(),
            3
        );
        let e = parse_events(Mode::Batch, &h, b"[{},{},{},{}]", 3).unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.to_string().contains("max_events_per_request"), "{e}");
        // Trailing garbage after the array is not JSON.
        let e = parse_events(Mode::Batch, &h, b"[{}] x", 3).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn structured_mode() {
        let body = serde_json::to_vec(&event_json(7)).unwrap();
        let events = parse_events(Mode::Structured, &HeaderMap::new(), &body, 100).unwrap();
        let ev = events[0].as_ref().unwrap();
        let checked = check_event(ev, &pi1(), 1 << 20).unwrap();
        assert_eq!(checked.sequence, 7);
        assert_eq!(checked.producer, "p-1");
        let line: Value = serde_json::from_slice(&checked.line).unwrap();
        assert_eq!(line["data"], json!({"t": 21.5}));
        assert_eq!(line["sequence"], "00000000000000000007");
    }

    #[test]
    fn events_from_parsed_json() {
        let ev = event_from_value(&event_json(3)).unwrap();
        assert_eq!(check_event(&ev, &pi1(), 1 << 20).unwrap().sequence, 3);
        let mut bad = event_json(4);
        bad.as_object_mut().unwrap().remove("type");
        let r = event_from_value(&bad).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("id-4"));
        assert_eq!(r.reason, "missing attribute \"type\"");
        let r = event_from_value(&json!([1])).unwrap_err();
        assert_eq!(r.id, None);
        assert!(r.reason.contains("JSON object"), "{}", r.reason);
    }

    fn binary_headers(ct: Option<&str>) -> HeaderMap {
        let mut pairs = vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "b-1"),
            ("ce-type", "camera.snapshot"),
            ("ce-source", "/gateways/pi-1/ftp"),
            ("ce-subject", "caf%C3%A9"),
            ("ce-sequence", "5"),
            ("ce-producerid", "p-1"),
        ];
        if let Some(ct) = ct {
            pairs.push(("content-type", ct));
        }
        headers(&pairs)
    }

    #[test]
    fn binary_mode_with_json_text_and_bytes() {
        let one = |ct: Option<&str>, body: &[u8]| {
            let h = binary_headers(ct);
            let mut events = parse_events(Mode::Binary, &h, body, 100).unwrap();
            let ev = events.pop().unwrap().unwrap();
            let checked = check_event(&ev, &pi1(), 1 << 20).unwrap();
            serde_json::from_slice::<Value>(&checked.line).unwrap()
        };
        let v = one(Some("application/json"), b"{\"a\":1}");
        assert_eq!(v["data"], json!({"a": 1}));
        assert_eq!(v["subject"], "café", "ce- values are percent-decoded");
        assert_eq!(v["datacontenttype"], "application/json");

        let v = one(Some("text/plain"), b"hello");
        assert_eq!(v["data"], "hello");

        let v = one(Some("application/octet-stream"), &[0xff, 0x00, 0xfe]);
        assert_eq!(v["data_base64"], "/wD+");
        assert!(v.get("data").is_none());

        // Text that is not UTF-8 is kept as bytes too.
        let v = one(Some("text/plain"), &[0xc3, 0x28]);
        assert_eq!(v["data_base64"], "wyg=");

        let v = one(None, b"");
        assert!(v.get("data").is_none() && v.get("data_base64").is_none());

        // Without a content type the body is bytes, also when it happens to parse as
        // JSON (the SDK used to turn it into JSON data).
        let v = one(None, b"{\"a\":1}");
        assert_eq!(v["data_base64"], "eyJhIjoxfQ==");
        assert!(v.get("data").is_none() && v.get("datacontenttype").is_none());
    }

    /// The stored line of the one event of a body.
    fn stored(mode: Mode, h: &HeaderMap, body: &[u8]) -> String {
        let ev = parse_events(mode, h, body, 100)
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        String::from_utf8(check_event(&ev, &pi1(), 1 << 20).unwrap().line).unwrap()
    }

    /// Issue 24.2b: data is stored as the sender's document in every mode: numbers beyond
    /// an f64, 20-digit decimals, duplicate keys, key order and escapes byte for byte;
    /// only the whitespace between tokens goes.
    #[test]
    fn issue_24_data_is_stored_as_sent_in_every_mode() {
        let data = "{ \"big\": 12345678901234567890123, \"dec\": 0.12345678901234567891,\n  \"k\": 1, \"k\": 2, \"z\": 1.50, \"a\": \"\\u00e9\\n\" }";
        let want = ",\"data\":{\"big\":12345678901234567890123,\"dec\":0.12345678901234567891,\"k\":1,\"k\":2,\"z\":1.50,\"a\":\"\\u00e9\\n\"}}";
        let mut envelope = event_json(1);
        envelope.as_object_mut().unwrap().remove("data");
        let text = serde_json::to_string(&envelope).unwrap();
        let event = format!("{},\"data\": {data}}}", &text[..text.len() - 1]);

        let line = stored(
            Mode::Batch,
            &HeaderMap::new(),
            format!("[{event}]").as_bytes(),
        );
        assert!(line.ends_with(want), "{line}");
        let line = stored(Mode::Structured, &HeaderMap::new(), event.as_bytes());
        assert!(line.ends_with(want), "{line}");
        let line = stored(
            Mode::Binary,
            &binary_headers(Some("application/json")),
            data.as_bytes(),
        );
        assert!(line.ends_with(want), "{line}");
        // JSON is JSON in any case and with parameters (RFC 2045: case-insensitive).
        for ct in ["Application/JSON", "application/ld+json; charset=utf-8"] {
            let line = stored(Mode::Binary, &binary_headers(Some(ct)), data.as_bytes());
            assert!(line.ends_with(want), "{ct}: {line}");
            let mut e: Value = serde_json::from_str(&event).unwrap();
            e["datacontenttype"] = ct.into();
            let line = stored(
                Mode::Structured,
                &HeaderMap::new(),
                e.to_string().as_bytes(),
            );
            assert!(line.contains("\"data\":{"), "{ct}: {line}");
        }
        // The envelope is the SDK's, and the whole line reads back as a CloudEvent.
        let back: cloudevents::Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back.id(), "b-1");
    }

    #[test]
    fn attributes_twice_or_data_twice_are_rejected_by_name() {
        let rejected = |body: &str| {
            parse_events(Mode::Structured, &HeaderMap::new(), body.as_bytes(), 100)
                .unwrap()
                .pop()
                .unwrap()
                .unwrap_err()
        };
        let e = event_json(1).to_string();
        let r = rejected(&format!("{},\"id\":\"other\"}}", &e[..e.len() - 1]));
        assert_eq!(r.reason, "attribute \"id\" appears more than once");
        let r = rejected(&format!("{},\"data\":2}}", &e[..e.len() - 1]));
        assert_eq!(r.reason, "attribute \"data\" appears more than once");
        assert_eq!(r.id.as_deref(), Some("id-1"));
        let r = rejected(&format!("{},\"data_base64\":\"AA==\"}}", &e[..e.len() - 1]));
        assert!(
            r.reason.contains("either data or data_base64"),
            "{}",
            r.reason
        );
        // Data of a media type that is not JSON is a string.
        let mut v = event_json(1);
        v["datacontenttype"] = "text/plain".into();
        let r = rejected(&v.to_string());
        assert!(r.reason.contains("must be a JSON string"), "{}", r.reason);
        v["data"] = "21.5 C".into();
        let line = stored(
            Mode::Structured,
            &HeaderMap::new(),
            v.to_string().as_bytes(),
        );
        assert!(line.ends_with(",\"data\":\"21.5 C\"}"), "{line}");
    }

    #[test]
    fn binary_mode_refuses_data_headers_and_missing_attributes() {
        let mut h = binary_headers(Some("text/plain"));
        h.insert("ce-data", HeaderValue::from_static("x"));
        let r = parse_events(Mode::Binary, &h, b"x", 100)
            .unwrap()
            .pop()
            .unwrap();
        assert!(r.unwrap_err().reason.contains("ce-data"));

        let mut h = binary_headers(Some("text/plain"));
        h.remove("ce-type");
        let r = parse_events(Mode::Binary, &h, b"x", 100)
            .unwrap()
            .pop()
            .unwrap();
        let r = r.unwrap_err();
        assert_eq!(r.id.as_deref(), Some("b-1"));
        assert!(r.reason.contains("type"), "{}", r.reason);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").unwrap(), "a b");
        assert_eq!(percent_decode("%E2%82%AC").unwrap(), "€");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%FF").is_err());
    }

    fn check(v: Value, principal: &Principal) -> Result<CheckedEvent, Rejection> {
        check_event(&event_from_value(&v).unwrap(), principal, 1 << 20)
    }

    #[test]
    fn spoofed_sources_are_rejected() {
        let mut v = event_json(1);
        v["source"] = json!("/gateways/pi-2/mqtt");
        let r = check(v, &pi1()).unwrap_err();
        assert_eq!(
            r.reason,
            "source /gateways/pi-2/mqtt does not belong to gateway pi-1"
        );
        assert_eq!(r.id.as_deref(), Some("id-1"));
    }

    #[test]
    fn anonymous_events_take_the_gateway_from_their_source() {
        let mut v = event_json(1);
        v["source"] = json!("/gateways/pi-9/mqtt");
        assert_eq!(
            check(v.clone(), &Principal::Anonymous)
                .unwrap()
                .gateway
                .as_str(),
            "pi-9"
        );
        v["source"] = json!("urn:sensor:1");
        let r = check(v, &Principal::Anonymous).unwrap_err();
        assert!(r.reason.contains("does not name a gateway"), "{}", r.reason);
    }

    #[test]
    fn sequence_and_producerid_are_required() {
        let cases: [(&str, Value, &str); 6] = [
            (
                "sequence",
                Value::Null,
                "missing extension attribute 'sequence'",
            ),
            (
                "sequence",
                json!("-4"),
                "invalid extension attribute 'sequence'",
            ),
            ("sequence", json!(4), "'sequence' must be a string"),
            (
                "producerid",
                Value::Null,
                "missing extension attribute 'producerid'",
            ),
            ("producerid", json!(""), "'producerid' must be 1 to 64"),
            (
                "producerid",
                json!("x".repeat(65)),
                "'producerid' must be 1 to 64",
            ),
        ];
        for (attr, value, expected) in cases {
            let mut v = event_json(1);
            if value.is_null() {
                v.as_object_mut().unwrap().remove(attr);
            } else {
                v[attr] = value;
            }
            let r = check(v, &pi1()).unwrap_err();
            assert!(r.reason.contains(expected), "{attr}: {}", r.reason);
        }
    }

    #[test]
    fn events_over_max_event_bytes_are_rejected() {
        let mut v = event_json(1);
        v["data"] = json!("x".repeat(2000));
        let ev = event_from_value(&v).unwrap();
        assert!(check_event(&ev, &pi1(), 4000).is_ok());
        let r = check_event(&ev, &pi1(), 1000).unwrap_err();
        assert!(r.reason.contains("max_event_bytes"), "{}", r.reason);
    }

    #[test]
    fn settled_below_headers() {
        assert_eq!(settled_below(&HeaderMap::new()), Ok(None));
        assert_eq!(
            settled_below(&headers(&[
                ("pigeon-settled-below", "120"),
                ("pigeon-producer-id", "p-1")
            ])),
            Ok(Some(SettledBelowHeader {
                producer: "p-1".into(),
                below: 120
            }))
        );
        for bad in [
            &[("pigeon-settled-below", "120")][..],
            &[("pigeon-producer-id", "p-1")][..],
            &[("pigeon-settled-below", "-1"), ("pigeon-producer-id", "p")][..],
            &[("pigeon-settled-below", "+1"), ("pigeon-producer-id", "p")][..],
            &[("pigeon-settled-below", "1"), ("pigeon-producer-id", "")][..],
        ] {
            assert_eq!(
                settled_below(&headers(bad)).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
    }
}
