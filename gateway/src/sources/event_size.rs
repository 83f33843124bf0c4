//! How long a record's event is as the JSON the relay measures, known before it is
//! committed.
//!
//! The relay refuses an event whose structured JSON (the line it stores) is longer than
//! its `limits.max_event_bytes`. The gateway hears that only when it uploads — after the
//! producer was acknowledged — and the event ends as a dead letter. [`event_json_len`]
//! tells at ingest: the length of what the uplink's encoder (`uplink::encode`) sends for
//! the record once the outbox has given it its id and `sequence`, which is the line the
//! relay measures. Binary data and the attributes around it are reckoned without
//! building the event (the tests hold that to the encoder's output); how JSON data
//! travels is the encoder's business, so a JSON record is measured by encoding it — only
//! when a cheap bound says it might not fit.

use std::io;

use pigeon_shared::ce::{EXT_PRODUCER_ID, EXT_SEQUENCE};
use serde::Serialize;

use crate::config::Compression;
use crate::outbox::{NewRecord, Record};
use crate::uplink::encode_batch;

/// A CloudEvent `id` as the outbox assigns it: a hyphenated UUID.
const ID_LEN: u64 = 36;

/// A `sequence` as `ce::format_sequence` renders any: zero-padded to 20 digits.
const SEQUENCE_LEN: u64 = 20;

/// A producer id as the outbox creates it (a hyphenated UUID), for checks made before
/// the outbox is open.
pub(crate) const PRODUCER_ID_LEN: u64 = 36;

/// How much longer than it came the encoder could write a JSON document. It sends the
/// sender's text without white space, never longer; 8 also covers an encoder that parses
/// it and writes it again (numbers re-rendered: `1e9` becomes `1000000000.0`, at most 24
/// characters from a float of at least 3), so that such a change cannot make the
/// cheap test below wrong, only slower.
const JSON_GROWTH: u64 = 8;

const JSON: &str = "application/json";
const OCTET_STREAM: &str = "application/octet-stream";

/// Counts what is written to it.
struct Count(u64);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The length of `value` as compact JSON.
fn json_len<T: Serialize + ?Sized>(value: &T) -> u64 {
    let mut n = Count(0);
    // Writing to a counter cannot fail, nor can serializing a string or a JSON value.
    let _ = serde_json::to_writer(&mut n, value);
    n.0
}

/// The length of `n` bytes in `data_base64`, quotes included.
fn base64_len(n: u64) -> u64 {
    n.div_ceil(3) * 4 + 2
}

/// The time as the event carries it (the receive time; chrono writes only as many
/// fractional digits as it needs).
fn time_len(time_us: i64) -> Option<u64> {
    chrono::DateTime::from_timestamp_micros(time_us).map(|t| json_len(&t))
}

/// Everything of an event but its data's value, each string's length as JSON.
struct Envelope<'a> {
    source: &'a str,
    event_type: &'a str,
    /// `subject`, quoted and escaped.
    subject: Option<u64>,
    /// `time`, quoted.
    time: Option<u64>,
    content_type: &'a str,
    /// `data` or `data_base64`.
    data_key: &'static str,
    /// `producerid`, quoted and escaped.
    producer_id: u64,
}

impl Envelope<'_> {
    /// `{"specversion":"1.0","id":…,…,"data_base64":` and the rest but the data's value.
    fn len(&self) -> u64 {
        let entry = |key: &str, value: u64| json_len(key) + 1 + value;
        let entries = [
            Some(entry("specversion", json_len("1.0"))),
            Some(entry("id", ID_LEN + 2)),
            Some(entry("type", json_len(self.event_type))),
            Some(entry("source", json_len(self.source))),
            Some(entry("datacontenttype", json_len(self.content_type))),
            self.subject.map(|s| entry("subject", s)),
            self.time.map(|t| entry("time", t)),
            Some(entry(self.data_key, 0)),
            Some(entry(EXT_SEQUENCE, SEQUENCE_LEN + 2)),
            Some(entry(EXT_PRODUCER_ID, self.producer_id)),
        ];
        let (count, sum) = entries
            .iter()
            .flatten()
            .fold((0, 0), |(c, s), e| (c + 1, s + e));
        // Braces and the commas between entries.
        2 + sum + (count - 1)
    }
}

fn envelope<'a>(
    record: &'a NewRecord,
    content_type: &'a str,
    data_key: &'static str,
    producer_id: &str,
) -> Envelope<'a> {
    Envelope {
        source: &record.source,
        event_type: &record.event_type,
        subject: record.subject.as_deref().map(json_len),
        time: time_len(record.time_us),
        content_type,
        data_key,
        producer_id: json_len(producer_id),
    }
}

/// The length in bytes of `record`'s CloudEvent as structured JSON — what the uplink
/// sends under `producer_id`, whatever id and sequence the outbox gives it, and what the
/// relay compares with its `limits.max_event_bytes`.
pub(crate) fn event_json_len(record: &NewRecord, producer_id: &str) -> u64 {
    match record.content_type.as_deref().unwrap_or(OCTET_STREAM) {
        JSON => encoded_len(record, producer_id),
        // Anything else travels as bytes.
        content_type => {
            envelope(record, content_type, "data_base64", producer_id).len()
                + base64_len(record.data.len() as u64)
        }
    }
}

/// The length of the event as the encoder writes it (0 if it cannot: the uplink then
/// refuses the record itself).
fn encoded_len(record: &NewRecord, producer_id: &str) -> u64 {
    let committed = Record {
        // Any id and sequence are as long as these.
        seq: u64::MAX,
        id: uuid::Uuid::nil(),
        source: record.source.clone(),
        event_type: record.event_type.clone(),
        subject: record.subject.clone(),
        time_us: record.time_us,
        content_type: record.content_type.clone(),
        data: record.data.to_vec(),
        file: None,
        priority: record.policy.priority,
    };
    match encode_batch(&[committed], producer_id, Compression::None) {
        // Without the batch's brackets.
        (body, None) => body.len().saturating_sub(2) as u64,
        (_, Some(_)) => 0,
    }
}

/// `Some(`[`event_json_len`]`)` when `record`'s event would be longer than `limit`.
///
/// Cheap for the usual small reading: a JSON document is encoded only when eight times
/// its length (the most the encoder can make of it) might not fit.
pub(crate) fn over_limit(record: &NewRecord, producer_id: &str, limit: u64) -> Option<u64> {
    if record.content_type.as_deref() == Some(JSON) {
        let len = record.data.len() as u64;
        let as_json = envelope(record, JSON, "data", producer_id).len() + JSON_GROWTH * len;
        let as_bytes = envelope(record, OCTET_STREAM, "data_base64", producer_id).len();
        if as_json.max(as_bytes + base64_len(len)) <= limit {
            return None;
        }
    }
    let n = event_json_len(record, producer_id);
    (n > limit).then_some(n)
}

/// The longest event a message of `packet_bytes` can become when its payload is not
/// JSON (base64 makes 4 bytes of 3) and its topic needs no JSON escapes: as if the whole
/// packet were payload, with an empty subject — a topic takes one byte in the event for
/// each of its bytes taken from the payload, which would have taken 4/3. For any time
/// with a four-digit year, and a producer id as the outbox creates it.
pub(crate) fn largest_binary_event(source: &str, event_type: &str, packet_bytes: u64) -> u64 {
    let envelope = Envelope {
        source,
        event_type,
        subject: Some(json_len("")),
        // The longest time: microseconds shown.
        time: time_len(1_000_000_000_000_001),
        content_type: OCTET_STREAM,
        data_key: "data_base64",
        producer_id: PRODUCER_ID_LEN + 2,
    };
    envelope.len() + base64_len(packet_bytes)
}

/// The largest `packet_bytes` whose [`largest_binary_event`] is at most `limit`; `None`
/// if not even an empty message's is.
pub(crate) fn largest_packet_within(source: &str, event_type: &str, limit: u64) -> Option<u64> {
    let empty = largest_binary_event(source, event_type, 0);
    // Each 3 bytes of payload take 4 characters.
    limit.checked_sub(empty).map(|room| room / 4 * 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Policy;

    const PRODUCER: &str = "0b7c3f5e-4d1a-4c8e-9a51-3e2f7d6c5b4a";

    fn record(subject: Option<&str>, content_type: Option<&str>, data: &[u8]) -> NewRecord {
        NewRecord {
            source: "/gateways/pi-1/mqtt".into(),
            event_type: "io.pigeon.sensor.reading".into(),
            subject: subject.map(str::to_owned),
            time_us: 1_763_000_000_123_456,
            content_type: content_type.map(str::to_owned),
            data: bytes::Bytes::copy_from_slice(data),
            expires_us: None,
            delivery: None,
            file: None,
            policy: Policy::default(),
        }
    }

    /// What the uplink sends for `r` (a batch of one, uncompressed, without its
    /// brackets), committed with the largest sequence.
    fn encoded(r: &NewRecord) -> Vec<u8> {
        let rec = Record {
            seq: u64::MAX,
            id: uuid::Uuid::now_v7(),
            source: r.source.clone(),
            event_type: r.event_type.clone(),
            subject: r.subject.clone(),
            time_us: r.time_us,
            content_type: r.content_type.clone(),
            data: r.data.to_vec(),
            file: None,
            priority: 5,
        };
        let (body, bad) = encode_batch(&[rec], PRODUCER, Compression::None);
        assert!(bad.is_none(), "{bad:?}");
        assert!(body.starts_with(b"[{") && body.ends_with(b"}]"));
        body[1..body.len() - 1].to_vec()
    }

    fn assert_exact(r: &NewRecord) -> u64 {
        let sent = encoded(r);
        assert_eq!(
            event_json_len(r, PRODUCER),
            sent.len() as u64,
            "{}",
            String::from_utf8_lossy(&sent[..sent.len().min(400)])
        );
        sent.len() as u64
    }

    #[test]
    fn the_length_is_what_the_encoder_sends() {
        let long_topic =
            "org/contoso/site/berlin/building/41/floor/3/room/4/sensors/climate/".repeat(900);
        let mut binary: Vec<u8> = (0..=255).collect();
        binary.extend_from_slice(b"\xff\x00raw");
        let json =
            br#"{ "t": 21.5, "h": [1, 2e3, -0, "\u00e9\n\"\\\/"], "k": {"a": null, "a": true} }"#;
        for (subject, ct, data) in [
            (Some("org/a/b"), Some(JSON), &json[..]),
            (Some("org/a/b"), Some(OCTET_STREAM), &binary[..]),
            (Some("org/a/b"), Some(OCTET_STREAM), &b""[..]),
            (Some("org/a/b"), Some(OCTET_STREAM), &b"x"[..]),
            (Some("org/a/b"), Some(OCTET_STREAM), &b"xy"[..]),
            (Some(long_topic.as_str()), Some(OCTET_STREAM), &binary[..]),
            (Some(long_topic.as_str()), Some(JSON), &json[..]),
            // Topics are UTF-8 and may hold anything JSON must escape.
            (Some("a\"b\\c\u{1}d\u{7f}é/\u{2028}"), Some(JSON), &b"1"[..]),
            (None, None, &b"no subject, no type"[..]),
            (Some("t"), Some("text/plain"), &b"plain"[..]),
            // Marked JSON but not (a damaged record): sent as bytes.
            (Some("t"), Some(JSON), &b"{not json"[..]),
        ] {
            assert_exact(&record(subject, ct, data));
        }
    }

    #[test]
    fn every_sequence_is_as_long() {
        use pigeon_shared::ce::format_sequence;
        for seq in [0, 1, u64::MAX] {
            assert_eq!(format_sequence(seq).len() as u64, SEQUENCE_LEN);
        }
    }

    #[test]
    fn the_time_is_as_long_as_its_fraction() {
        for time_us in [
            1_763_000_000_000_000, // whole seconds
            1_763_000_000_120_000, // milliseconds
            1_763_000_000_123_456,
            0,
        ] {
            let mut r = record(Some("t"), Some(OCTET_STREAM), b"1");
            r.time_us = time_us;
            assert_exact(&r);
        }
    }

    #[test]
    fn over_limit_is_exact_at_the_limit() {
        // JSON the encoder may write longer than it came (numbers written again).
        let numbers = format!("[{}9e9]", "9e9,".repeat(200));
        let big_numbers = format!("[{}1e15]", "1e15,".repeat(999));
        for r in [
            record(Some("org/a"), Some(JSON), br#"{"t":21.5}"#),
            record(Some("org/a"), Some(JSON), numbers.as_bytes()),
            record(Some("org/a"), Some(JSON), big_numbers.as_bytes()),
            record(Some("org/a"), Some(JSON), b" -0 "),
            record(
                Some("org/a"),
                Some(JSON),
                br#"{"k":1,"k":2, "big": 12345678901234567890123}"#,
            ),
            record(Some("org/a"), Some(JSON), b"{not json"),
            record(Some("org/a"), Some(OCTET_STREAM), &[7u8; 1000]),
            record(Some("org/a"), Some(OCTET_STREAM), b""),
        ] {
            let n = assert_exact(&r);
            assert_eq!(over_limit(&r, PRODUCER, n), None);
            assert_eq!(over_limit(&r, PRODUCER, n - 1), Some(n));
            assert_eq!(over_limit(&r, PRODUCER, u64::MAX), None);
        }
    }

    #[test]
    fn the_largest_binary_event_bounds_every_message_of_that_size() {
        let packet = 3000u64;
        let bound = largest_binary_event("/gateways/pi-1/mqtt", "io.pigeon.sensor.reading", packet);
        // MQTT packet: topic length (2), topic, packet id (2), payload.
        for topic_len in [1usize, 2, 3, 100, 1000, 2990] {
            let topic = "t".repeat(topic_len);
            let payload = vec![0u8; packet as usize - 4 - topic_len];
            let mut r = record(Some(&topic), Some(OCTET_STREAM), &payload);
            r.time_us = 253_402_300_799_999_999; // the last microsecond of 9999
            let sent = assert_exact(&r);
            assert!(sent <= bound, "topic of {topic_len}: {sent} > {bound}");
        }
        // And it is tight: the whole packet as payload under an empty topic.
        let mut r = record(Some(""), Some(OCTET_STREAM), &vec![0u8; packet as usize]);
        r.time_us = 1_763_000_000_123_456;
        assert_eq!(
            event_json_len(&r, &"p".repeat(PRODUCER_ID_LEN as usize)),
            bound
        );
    }

    #[test]
    fn largest_packet_within_is_the_last_that_fits() {
        let (src, ty) = ("/gateways/pi-1/mqtt", "io.pigeon.sensor.reading");
        for limit in [2 << 20, 1 << 20, 64 << 10, 1000, 600] {
            let p = largest_packet_within(src, ty, limit).unwrap();
            assert!(largest_binary_event(src, ty, p) <= limit, "{limit}");
            assert!(largest_binary_event(src, ty, p + 1) > limit, "{limit}");
        }
        assert_eq!(largest_packet_within(src, ty, 100), None);
    }
}
