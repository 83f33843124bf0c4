//! Outbox records → CloudEvents (cloudevents-sdk) → a batch-mode request body.

use std::io::Write;

use cloudevents::{AttributesWriter, EventBuilder, EventBuilderV10};
use pigeon_shared::ce::{EXT_PRODUCER_ID, EXT_SEQUENCE, format_sequence};
use pigeon_shared::json;

use crate::config::Compression;
use crate::outbox::Record;

/// The CloudEvent for one record.
///
/// `application/json` data travels as JSON (`data`); anything else as bytes
/// (`data_base64`). A record marked JSON whose bytes do not parse (it cannot happen for
/// records this gateway wrote, but the database is on an SD card) is sent as bytes.
pub(crate) fn to_event(rec: &Record, producer_id: &str) -> Result<cloudevents::Event, String> {
    let b = envelope(rec, producer_id)?;
    let ct = rec
        .content_type
        .as_deref()
        .unwrap_or("application/octet-stream");
    let b = match ct {
        "application/json" => match serde_json::from_slice::<serde_json::Value>(&rec.data) {
            Ok(v) => b.data(ct, v),
            Err(_) => b.data("application/octet-stream", rec.data.clone()),
        },
        _ => b.data(ct, rec.data.clone()),
    };
    b.build()
        .map_err(|e| format!("cannot build a CloudEvent: {e}"))
}

/// The event's attributes, without data.
fn envelope(rec: &Record, producer_id: &str) -> Result<EventBuilderV10, String> {
    let time = chrono::DateTime::from_timestamp_micros(rec.time_us)
        .ok_or_else(|| format!("receive time {} µs is out of range", rec.time_us))?;
    let mut b = EventBuilderV10::new()
        .id(rec.id.to_string())
        .source(rec.source.as_str())
        .ty(rec.event_type.as_str())
        .time(time)
        .extension(EXT_SEQUENCE, format_sequence(rec.seq))
        .extension(EXT_PRODUCER_ID, producer_id);
    if let Some(s) = &rec.subject {
        b = b.subject(s.as_str());
    }
    Ok(b)
}

/// The structured JSON of one record's CloudEvent, as the batch carries it.
///
/// JSON data travels as the sender's text (whitespace between tokens removed, see
/// [`pigeon_shared::json`]), never parsed into a tree and written again, so numbers that
/// do not fit an `f64` and duplicate keys reach the relay unchanged. A record marked JSON
/// whose bytes are not JSON (the database is on an SD card) is sent as bytes.
pub(crate) fn event_json(rec: &Record, producer_id: &str) -> Result<Vec<u8>, String> {
    let json_text = (rec.content_type.as_deref() == Some("application/json"))
        .then(|| std::str::from_utf8(&rec.data).ok())
        .flatten()
        .filter(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok());
    let Some(text) = json_text else {
        let event = to_event(rec, producer_id)?;
        return serde_json::to_vec(&event).map_err(|e| e.to_string());
    };
    let mut event = envelope(rec, producer_id)?
        .build()
        .map_err(|e| format!("cannot build a CloudEvent: {e}"))?;
    event.set_datacontenttype(Some("application/json"));
    let mut out = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
    json::push_member(&mut out, "data", &json::compact(text));
    Ok(out)
}

/// Encodes `batch` as a CloudEvents batch (a JSON array), compressed as configured.
/// If a record cannot be encoded, returns its sequence and the reason instead.
pub(crate) fn encode_batch(
    batch: &[Record],
    producer_id: &str,
    compression: Compression,
) -> (Vec<u8>, Option<(u64, String)>) {
    // Events are built and written one at a time, straight into the compressor: the
    // memory a batch needs is its compressed size, not its JSON plus every event as a
    // tree (which is what a Pi notices when it drains a backlog).
    let estimate = batch.iter().map(|r| r.data.len() + 300).sum::<usize>();
    let result = match compression {
        Compression::None => {
            let mut out = Vec::with_capacity(estimate);
            write_batch(&mut out, batch, producer_id).map(|()| out)
        }
        Compression::Gzip => {
            let gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(estimate / 4),
                flate2::Compression::fast(),
            );
            let mut w = std::io::BufWriter::with_capacity(16 * 1024, gz);
            write_batch(&mut w, batch, producer_id).and_then(|()| {
                w.into_inner()
                    .map_err(|e| (None, e.error().to_string()))?
                    .finish()
                    .map_err(|e| (None, e.to_string()))
            })
        }
    };
    match result {
        Ok(b) => (b, None),
        Err((seq, e)) => (
            Vec::new(),
            seq.or_else(|| batch.first().map(|r| r.seq)).map(|s| (s, e)),
        ),
    }
}

/// Writes the batch as a JSON array of structured CloudEvents. On failure: the sequence
/// of the record that cannot be encoded (if it is that record's fault) and why.
fn write_batch(
    w: &mut impl Write,
    batch: &[Record],
    producer_id: &str,
) -> Result<(), (Option<u64>, String)> {
    let io = |e: std::io::Error| (None, e.to_string());
    w.write_all(b"[").map_err(io)?;
    for (i, rec) in batch.iter().enumerate() {
        if i > 0 {
            w.write_all(b",").map_err(io)?;
        }
        let event = event_json(rec, producer_id).map_err(|reason| (Some(rec.seq), reason))?;
        w.write_all(&event).map_err(io)?;
    }
    w.write_all(b"]").map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn rec(seq: u64, ct: &str, data: &[u8]) -> Record {
        Record {
            seq,
            id: uuid::Uuid::now_v7(),
            source: "/gateways/pi-1/mqtt".into(),
            event_type: "reading".into(),
            subject: Some("org/a/b".into()),
            time_us: 1_763_000_000_123_456,
            content_type: Some(ct.into()),
            data: data.to_vec(),
            file: None,
            priority: 5,
        }
    }

    #[test]
    fn batch_is_a_json_array_of_structured_events() {
        let batch = [
            rec(7, "application/json", br#"{"b":1,"a":[true,null]}"#),
            rec(8, "application/octet-stream", b"\xff\x00raw"),
        ];
        let (body, bad) = encode_batch(&batch, "prod-1", Compression::Gzip);
        assert!(bad.is_none());
        let mut json = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut json)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let e0 = &v[0];
        assert_eq!(e0["specversion"], "1.0");
        assert_eq!(e0["id"], batch[0].id.to_string());
        assert_eq!(e0["source"], "/gateways/pi-1/mqtt");
        assert_eq!(e0["subject"], "org/a/b");
        assert_eq!(e0["sequence"], "00000000000000000007");
        assert_eq!(e0["producerid"], "prod-1");
        assert_eq!(e0["datacontenttype"], "application/json");
        assert_eq!(e0["data"], serde_json::json!({"b": 1, "a": [true, null]}));
        assert_eq!(e0["time"], "2025-11-13T02:13:20.123456Z");
        // Key order of JSON data is kept.
        assert!(json.find("\"b\":1").unwrap() < json.find("\"a\":[").unwrap());
        let e1 = &v[1];
        assert_eq!(e1["data_base64"], "/wByYXc=");
        assert!(e1.get("data").is_none());
        // And it parses back as CloudEvents.
        let back: Vec<cloudevents::Event> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 2);
    }

    #[test]
    fn corrupt_json_record_is_sent_as_bytes() {
        let e = to_event(&rec(1, "application/json", b"{not json"), "p").unwrap();
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["datacontenttype"], "application/octet-stream");
        assert!(v.get("data_base64").is_some());
        let line = event_json(&rec(1, "application/json", b"{not json"), "p").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["datacontenttype"], "application/octet-stream");
        assert_eq!(v["data_base64"], "e25vdCBqc29u");
    }

    /// Issue 24.2b: a reading is the sender's document. Numbers beyond an f64, 20-digit
    /// decimals, duplicate keys and escapes reach the relay as sent.
    #[test]
    fn issue_24_json_data_is_sent_as_the_senders_text() {
        let payload = "{\"big\": 12345678901234567890123,\n \"dec\": 0.12345678901234567891,\n \"k\": 1, \"k\": 2, \"e\": \"\\u00e9 \\\"\", \"f\": 1.50}";
        let r = rec(3, "application/json", payload.as_bytes());
        let line = event_json(&r, "p").unwrap();
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.ends_with(
                ",\"data\":{\"big\":12345678901234567890123,\"dec\":0.12345678901234567891,\"k\":1,\"k\":2,\"e\":\"\\u00e9 \\\"\",\"f\":1.50}}"
            ),
            "{line}"
        );
        // The rest is the same event as the SDK's.
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let sdk_rec = Record {
            data: b"{}".to_vec(),
            ..r.clone()
        };
        let mut sdk = serde_json::to_value(to_event(&sdk_rec, "p").unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("data");
        sdk.as_object_mut().unwrap().remove("data");
        assert_eq!(v, sdk);
        // A bare JSON value is data too.
        let line = event_json(&rec(4, "application/json", b" 1e400 "), "p").unwrap();
        assert!(
            line.ends_with(b",\"data\":1e400}"),
            "{}",
            String::from_utf8_lossy(&line)
        );
    }
}
