//! CloudEvents conventions shared by the gateway and the relay.
//!
//! Every event a gateway emits has:
//!
//! * `id` — a UUIDv7 assigned once, when the record is committed to the gateway's outbox,
//!   so it is time-ordered and stays the same on every re-send;
//! * `source` — `/gateways/<gateway-id>/<input>`, e.g. `/gateways/pi-1/mqtt`; the relay
//!   only accepts events whose source belongs to the authenticated gateway;
//! * `sequence` — the [CloudEvents sequence extension]: a per-producer, strictly
//!   increasing number, rendered as a zero-padded decimal string so that string order is
//!   numeric order;
//! * `producerid` — which outbox assigned the sequence (a UUID created with the outbox
//!   database). A gateway whose outbox is ever recreated starts a new sequence under a new
//!   producer id, so the relay never mistakes its new events for old ones.
//!
//! The pair (`producerid`, `sequence`) plays the role of Kafka's producer id and sequence
//! number: it is what the relay deduplicates on.
//!
//! [CloudEvents sequence extension]: https://github.com/cloudevents/spec/blob/main/cloudevents/extensions/sequence.md

use std::fmt;

/// Name of the CloudEvents sequence extension attribute.
pub const EXT_SEQUENCE: &str = "sequence";
/// Name of the extension attribute that says which outbox assigned the sequence.
pub const EXT_PRODUCER_ID: &str = "producerid";

/// Name of the [dataref extension] (claim check): where the event's payload is stored.
/// The relay sets it on the events of uploaded files.
///
/// [dataref extension]: https://github.com/cloudevents/spec/blob/main/cloudevents/extensions/dataref.md
pub const EXT_DATAREF: &str = "dataref";

/// Content type of a structured-mode CloudEvent (one event, JSON format).
pub const CONTENT_TYPE_STRUCTURED: &str = "application/cloudevents+json";
/// Content type of a batch of structured CloudEvents (a JSON array).
pub const CONTENT_TYPE_BATCH: &str = "application/cloudevents-batch+json";

/// The prefix of every gateway `source`.
pub const SOURCE_PREFIX: &str = "/gateways/";

/// Width of a rendered sequence number: enough digits for any `u64`.
const SEQUENCE_WIDTH: usize = 20;

/// Renders a sequence number the way it travels in the `sequence` extension.
///
/// ```
/// assert_eq!(pigeon_shared::ce::format_sequence(42), "00000000000000000042");
/// ```
pub fn format_sequence(seq: u64) -> String {
    format!("{seq:0SEQUENCE_WIDTH$}")
}

/// Parses a `sequence` extension value back into a number.
///
/// Accepts any non-empty string of ASCII digits that fits a `u64` (padding optional), so
/// producers other than pigeon-gateway may send unpadded numbers.
pub fn parse_sequence(s: &str) -> Result<u64, InvalidSequence> {
    if s.is_empty() || s.len() > SEQUENCE_WIDTH || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidSequence(s.chars().take(40).collect()));
    }
    s.parse().map_err(|_| InvalidSequence(s.to_owned()))
}

/// A `sequence` value that is not a decimal number that fits 64 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sequence {0:?} is not a decimal number of at most 20 digits")]
pub struct InvalidSequence(pub String);

/// A validated gateway identifier.
///
/// 1 to 64 characters from `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`. The id is
/// used in event sources, file names and object keys, so it must be safe in all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayId(String);

impl GatewayId {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, InvalidGatewayId> {
        let ok_len = !s.is_empty() && s.len() <= 64;
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        let ok_start = !s.starts_with('.') && !s.starts_with('-');
        if ok_len && ok_chars && ok_start {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidGatewayId(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `source` of events from `input` on this gateway, e.g. `/gateways/pi-1/mqtt`.
    pub fn source(&self, input: &str) -> String {
        format!("{SOURCE_PREFIX}{}/{input}", self.0)
    }

    /// Whether `source` names this gateway (`/gateways/<id>` or anything below it).
    pub fn owns_source(&self, source: &str) -> bool {
        source_gateway(source) == Some(self.0.as_str())
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for GatewayId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GatewayId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for GatewayId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A string that cannot be a gateway id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid gateway id {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-'"
)]
pub struct InvalidGatewayId(pub String);

/// The gateway id a `source` names, if it follows the `/gateways/<id>[/...]` convention.
pub fn source_gateway(source: &str) -> Option<&str> {
    let rest = source.strip_prefix(SOURCE_PREFIX)?;
    let id = rest.split('/').next().unwrap_or(rest);
    (!id.is_empty()).then_some(id)
}

/// Checks the segments of a gateway's `source` (`/gateways/<id>/<input>/…`): none may be
/// empty, `.` or `..` (also percent-encoded), so that no normalisation of the URI can make
/// it name another gateway's input (`/gateways/pi-a/../pi-b/mqtt`).
///
/// ```
/// use pigeon_shared::ce::check_source_segments;
/// assert!(check_source_segments("/gateways/pi-a/mqtt").is_ok());
/// assert!(check_source_segments("/gateways/pi-a/../pi-b/mqtt").is_err());
/// ```
pub fn check_source_segments(source: &str) -> Result<(), String> {
    let path = source.split(['?', '#']).next().unwrap_or(source);
    let Some(rest) = path.strip_prefix(SOURCE_PREFIX) else {
        return Ok(());
    };
    for (i, segment) in rest.split('/').enumerate() {
        let problem = match dots_only(segment) {
            Some(0) => "an empty segment",
            Some(1) => "a '.' segment",
            Some(2) => "a '..' segment",
            _ => continue,
        };
        return Err(format!(
            "source {source:?} has {problem} (segment {} after {SOURCE_PREFIX}); a source names its gateway and input without empty, '.' or '..' segments",
            i + 1
        ));
    }
    Ok(())
}

/// How many dots `segment` is, if it is nothing but dots (`.` or `%2e` in either case);
/// without allocating, as it runs for every event.
fn dots_only(segment: &str) -> Option<usize> {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = if rest[0] == b'.' {
            &rest[1..]
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            &rest[3..]
        } else {
            return None;
        };
        dots += 1;
    }
    Some(dots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_24_sources_with_dot_or_empty_segments_are_refused() {
        for ok in [
            "/gateways/pi-a",
            "/gateways/pi-a/mqtt",
            "/gateways/pi-a/files/cam.1/x..y",
            "/other//x",
        ] {
            assert_eq!(check_source_segments(ok), Ok(()), "{ok}");
        }
        for (bad, problem) in [
            ("/gateways/pi-a/../pi-b/mqtt", "a '..' segment (segment 2"),
            ("/gateways/pi-a/%2E%2e/pi-b", "a '..' segment"),
            ("/gateways/pi-a/.%2E/pi-b", "a '..' segment"),
            ("/gateways/pi-a/%2e/mqtt", "a '.' segment"),
            ("/gateways/pi-a/./mqtt", "a '.' segment"),
            ("/gateways/pi-a//mqtt", "an empty segment (segment 2"),
            ("/gateways/pi-a/mqtt/", "an empty segment (segment 3"),
            ("/gateways//pi-a", "an empty segment (segment 1"),
        ] {
            let e = check_source_segments(bad).unwrap_err();
            assert!(e.contains(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn sequence_round_trips_and_orders_as_strings() {
        let values = [0u64, 1, 9, 10, 99, 1_000_000, u64::MAX];
        for pair in values.windows(2) {
            assert!(format_sequence(pair[0]) < format_sequence(pair[1]));
        }
        for v in values {
            assert_eq!(parse_sequence(&format_sequence(v)), Ok(v));
        }
        assert_eq!(parse_sequence("7"), Ok(7));
    }

    #[test]
    fn bad_sequences_are_refused() {
        for bad in [
            "",
            "-1",
            "1.5",
            "abc",
            " 1",
            "99999999999999999999",
            "000000000000000000001",
        ] {
            assert!(parse_sequence(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn gateway_ids() {
        for ok in ["pi-1", "Site_4.b", "a", &"x".repeat(64)] {
            assert!(GatewayId::new(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "ü",
            "..",
            &"x".repeat(65),
        ] {
            assert!(GatewayId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sources_belong_to_their_gateway_only() {
        let gw = GatewayId::new("pi-1").unwrap();
        assert_eq!(gw.source("mqtt"), "/gateways/pi-1/mqtt");
        assert!(gw.owns_source("/gateways/pi-1/mqtt"));
        assert!(gw.owns_source("/gateways/pi-1"));
        assert!(!gw.owns_source("/gateways/pi-10/mqtt"));
        assert!(!gw.owns_source("/gateways/pi-/mqtt"));
        assert!(!gw.owns_source("/other/pi-1/mqtt"));
        assert!(!gw.owns_source("gateways/pi-1/mqtt"));
    }
}
