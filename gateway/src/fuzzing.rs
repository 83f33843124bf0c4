//! Fuzz targets' harnesses for what a remote party or a file on disk can make the gateway
//! parse: MQTT packets from the broker, packed events read back from the outbox, and the
//! config file. See [`pigeon_shared::fuzzing`] for how they are run and replayed.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;

use crate::config::Config;
use crate::outbox::Record;
use crate::outbox::pack;
use crate::sources::mqtt::conn::{Decoder, Incoming};
use crate::sources::mqtt::record_from_publish;
use crate::uplink::encode;

/// Every packet (or the error) a decoder yields from `stream` fed in `chunks`-byte pieces.
fn decode(max_publish: usize, stream: &[u8], chunk: usize) -> Vec<Result<Incoming, String>> {
    let mut decoder = Decoder::new(max_publish);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.next(&mut buf) {
                Ok(Some(incoming)) => out.push(Ok(incoming)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }
    out
}

/// Fuzz target `mqtt_packets`: the bytes a broker sends, through the gateway's packet
/// decoder and, for each PUBLISH, into the event the uplink sends.
///
/// Input: two bytes of the PUBLISH size limit, one of the read size, then the stream.
/// Properties: the same packets come out however the stream is cut into reads; an
/// oversized PUBLISH is reported with its topic and packet id and never buffered; every
/// PUBLISH becomes an event whose `subject` is its topic and whose data is its payload,
/// byte for byte (JSON as its compacted text, anything else base64).
pub fn mqtt_packets(data: &[u8]) {
    let [a, b, c, stream @ ..] = data else {
        return;
    };
    let max_publish = 16 + usize::from(u16::from_be_bytes([*a, *b]));
    let whole = decode(max_publish, stream, stream.len());
    let cut = decode(max_publish, stream, usize::from(*c % 16) + 1);
    let show = |v: &[Result<Incoming, String>]| format!("{v:?}");
    assert_eq!(
        show(&whole),
        show(&cut),
        "the packets depend on how reads cut the stream"
    );
    let session: Arc<str> = Arc::from("s");
    for incoming in whole.into_iter().flatten() {
        match incoming {
            Incoming::Packet(Packet::Publish(p)) => {
                assert!(
                    p.payload.len() <= max_publish,
                    "an oversized PUBLISH was buffered"
                );
                let new =
                    record_from_publish(&p, "io.pigeon.reading", "/gateways/pi/mqtt", &session, 1);
                let record = Record {
                    seq: 1,
                    id: uuid::Uuid::nil(),
                    source: new.source,
                    event_type: new.event_type,
                    subject: new.subject,
                    time_us: new.time_us,
                    content_type: new.content_type,
                    data: new.data.to_vec(),
                    file: None,
                    priority: 0,
                };
                check_event_json(&record, &p.topic, &p.payload);
            }
            Incoming::Oversized { len, .. } => assert!(len > max_publish),
            Incoming::Packet(_) => {}
        }
    }
}

/// The event the uplink sends for `record` carries `topic` and `payload` unaltered.
fn check_event_json(record: &Record, topic: &str, payload: &[u8]) {
    let json = encode::event_json(record, "producer").expect("a PUBLISH always encodes");
    let text = std::str::from_utf8(&json).expect("the event is UTF-8");
    let members = pigeon_shared::json::members(text).expect("the event is a JSON object");
    let member = |name: &str| {
        members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.get())
    };
    let subject: Option<String> = member("subject").map(|s| serde_json::from_str(s).unwrap());
    assert_eq!(subject.as_deref(), Some(topic));
    match (member("data"), member("data_base64")) {
        (Some(data), None) => {
            let payload = std::str::from_utf8(payload).expect("JSON data from a UTF-8 payload");
            assert_eq!(data, pigeon_shared::json::compact(payload), "data altered");
        }
        (None, Some(b64)) => {
            let b64: String = serde_json::from_str(b64).unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            assert_eq!(bytes, payload, "data_base64 altered");
        }
        (None, None) => assert!(payload.is_empty(), "the payload was dropped"),
        (Some(_), Some(_)) => panic!("both data and data_base64"),
    }
}

/// Fuzz target `packed_event`: a packed event and its dictionary as the outbox might
/// hold them after a bad SD card, and the packing of any subject and data.
///
/// Input: one byte of the dictionary's length (×17), the dictionary, the packed bytes.
/// Properties: unpacking never panics and never yields more than a packed event may hold;
/// packing the same bytes (as subject and data) and unpacking them gives them back.
pub fn packed_event(data: &[u8]) {
    let [n, rest @ ..] = data else {
        return;
    };
    let (dictionary, packed) = rest.split_at((usize::from(*n) * 17).min(rest.len()));
    if let Ok((subject, data)) = pack::unpack_bytes(dictionary, packed) {
        assert!(subject.map_or(0, |s| s.len()) + data.len() <= pack::PACK_MAX + 8);
    }
    let cut = packed.len() / 3;
    let subject = (packed.first() != Some(&0)).then(|| String::from_utf8_lossy(&packed[..cut]));
    let (subject, data) = (subject.as_deref(), &packed[cut..]);
    if let Some(bytes) = pack::pack_bytes(dictionary, subject, data) {
        let back = pack::unpack_bytes(dictionary, &bytes);
        if bytes.len() <= pack::PACK_MAX {
            let (s, d) = back.expect("what was packed unpacks");
            assert_eq!((s.as_deref(), d.as_slice()), (subject, data));
        }
    }
}

/// Fuzz target `gateway_config`: any text as the gateway's config file. Properties: no
/// panic, and an error names the file.
pub fn gateway_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::from_toml(text, Path::new("fuzz.toml")) {
        assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use pigeon_shared::fuzzing::replay;

    #[test]
    fn mqtt_packets_corpus() {
        replay("mqtt_packets", super::mqtt_packets);
    }

    #[test]
    fn packed_event_corpus() {
        replay("packed_event", super::packed_event);
    }

    #[test]
    fn gateway_config_corpus() {
        replay("gateway_config", super::gateway_config);
    }
}
