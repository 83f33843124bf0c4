//! Readings published to the broker arrive in the relay's stream exactly once, intact,
//! as CloudEvents that follow Pigeon's conventions.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use base64::Engine as _;
use pigeon_e2e::{
    GATEWAY_ID, Pipeline, Publisher, READING_TYPE, Reading, climate_payload, climate_readings,
    climate_topic, secs, wait_until,
};
use serde_json::{Value, json};

/// Checks that `e` has the attributes every gateway event must have; problems go to `out`.
fn check_envelope(e: &Value, out: &mut Vec<String>) {
    let source = format!("/gateways/{GATEWAY_ID}/mqtt");
    let subject = e["subject"].as_str().unwrap_or("?");
    if e["specversion"] != "1.0" {
        out.push(format!("{subject}: specversion {}", e["specversion"]));
    }
    if e["source"] != source.as_str() {
        out.push(format!(
            "{subject}: source {} instead of {source}",
            e["source"]
        ));
    }
    if e["type"] != READING_TYPE {
        out.push(format!(
            "{subject}: type {} instead of {READING_TYPE}",
            e["type"]
        ));
    }
    // UUIDv7: 8-4-4-4-12 hex digits, version nibble 7.
    let id = e["id"].as_str().unwrap_or("");
    let hex_ok = id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !hex_ok || id.as_bytes()[14] != b'7' {
        out.push(format!("{subject}: id {:?} is not a UUIDv7", e["id"]));
    }
    let time = e["time"].as_str().unwrap_or("");
    if time.len() < 20 || !time.contains('T') {
        out.push(format!(
            "{subject}: time {:?} is not an RFC 3339 timestamp",
            e["time"]
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_readings_arrive_exactly_once_and_intact() {
    const COUNT: u64 = 10_000;
    let p = Pipeline::start("ten-thousand").await;

    let readings = climate_readings(0..COUNT);
    let expected: BTreeSet<u64> = readings.iter().map(|r| r.n).collect();
    let report =
        Publisher::publish_all(p.mosquitto.port(), readings, p.publisher(), secs(60)).await;
    report.assert_all_acked(COUNT as usize);

    let stream = p
        .relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;

    let mut problems = Vec::new();
    let mut ids = HashSet::new();
    let mut producers = BTreeSet::new();
    for (n, events) in stream.by_data_field("n") {
        let e = events[0];
        check_envelope(e, &mut problems);
        if e["subject"] != climate_topic(n).as_str() {
            problems.push(format!(
                "n={n}: subject {} instead of {}",
                e["subject"],
                climate_topic(n)
            ));
        }
        if e["datacontenttype"] != "application/json" {
            problems.push(format!("n={n}: datacontenttype {}", e["datacontenttype"]));
        }
        if e["data"] != climate_payload(n) {
            problems.push(format!(
                "n={n}: data {} instead of {}",
                e["data"],
                climate_payload(n)
            ));
        }
        if e.get("data_base64").is_some() {
            problems.push(format!("n={n}: has data_base64 as well as data"));
        }
        if !ids.insert(e["id"].to_string()) {
            problems.push(format!("n={n}: id {} used twice", e["id"]));
        }
        producers.insert(e["producerid"].to_string());
    }
    if producers.len() != 1 {
        problems.push(format!("expected one producerid, found {producers:?}"));
    }
    assert!(
        problems.is_empty(),
        "{} problems with the events, first ones:\n  {}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_payload_arrives_as_data_base64_next_to_intact_json() {
    let p = Pipeline::start("binary-payload").await;
    let base = "org/contoso/site/berlin/building/41/floor/1/room/9/sensors";
    // Not UTF-8 (lone continuation bytes, 0xFF, a NUL), and every byte value once.
    let mut binary = vec![0xFF, 0xFE, 0x00, 0x80, 0xC3, 0x28, 0xBF];
    binary.extend(0..=255u8);
    let text = "temperature=21.5°C".as_bytes().to_vec(); // UTF-8, but not JSON
    let readings = vec![
        Reading {
            n: 1,
            topic: format!("{base}/raw"),
            payload: binary.clone(),
        },
        Reading {
            n: 2,
            topic: climate_topic(2),
            payload: serde_json::to_vec(&climate_payload(2)).unwrap(),
        },
        Reading {
            n: 3,
            topic: format!("{base}/text"),
            payload: text.clone(),
        },
        Reading {
            n: 4,
            topic: format!("{base}/scalar"),
            payload: b"21.5".to_vec(),
        },
    ];
    let report =
        Publisher::publish_all(p.mosquitto.port(), readings, p.publisher(), secs(30)).await;
    report.assert_all_acked(4);

    wait_until("4 events in the relay's stream", secs(60), || async {
        let n = p.relay.read_stream().len();
        if n >= 4 {
            Ok(())
        } else {
            Err(format!("{n} so far"))
        }
    })
    .await;
    p.relay.wait_for_stream_quiet(Duration::from_secs(1)).await;
    let stream = p.relay.read_stream();
    assert_eq!(stream.len(), 4, "events: {:#?}", stream.events());
    let by_subject = |topic: &str| -> &Value {
        stream
            .events()
            .iter()
            .find(|e| e["subject"] == topic)
            .unwrap_or_else(|| panic!("no event with subject {topic}: {:#?}", stream.events()))
    };
    let mut problems = Vec::new();
    for e in stream.events() {
        check_envelope(e, &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
    stream.check_sequences().unwrap_or_else(|e| panic!("{e}"));

    let b64 = base64::engine::general_purpose::STANDARD;
    for (topic, bytes) in [
        (format!("{base}/raw"), &binary),
        (format!("{base}/text"), &text),
    ] {
        let e = by_subject(&topic);
        assert_eq!(e["datacontenttype"], "application/octet-stream", "{e:#}");
        assert!(e.get("data").is_none(), "binary event also has data: {e:#}");
        let decoded = b64
            .decode(
                e["data_base64"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no data_base64: {e:#}")),
            )
            .unwrap_or_else(|err| panic!("data_base64 is not base64 ({err}): {e:#}"));
        assert_eq!(&decoded, bytes, "bytes of {topic} changed");
    }

    let e = by_subject(&climate_topic(2));
    assert_eq!(e["datacontenttype"], "application/json", "{e:#}");
    assert_eq!(e["data"], climate_payload(2));
    assert!(e.get("data_base64").is_none(), "{e:#}");

    // A JSON text need not be an object.
    let e = by_subject(&format!("{base}/scalar"));
    assert_eq!(e["datacontenttype"], "application/json", "{e:#}");
    assert_eq!(e["data"], json!(21.5));
}

/// Issue 24.2b: a reading is stored as the sensor's document. Numbers that do not fit an
/// f64, 20-digit decimals, duplicate keys, key order and escapes arrive in the relay's
/// stream byte for byte; only the whitespace between JSON tokens is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_24_a_json_reading_is_stored_as_the_sensor_sent_it() {
    let p = Pipeline::start("as-sent").await;
    let payload = "{ \"meter\": 12345678901234567890123,\n  \"kwh\": 0.12345678901234567891,\n  \"v\": 1, \"v\": 2, \"t\": 21.50, \"unit\": \"\\u00b0C\" }";
    let stored = "{\"meter\":12345678901234567890123,\"kwh\":0.12345678901234567891,\"v\":1,\"v\":2,\"t\":21.50,\"unit\":\"\\u00b0C\"}";
    let topic = "org/contoso/site/berlin/building/41/floor/1/room/9/sensors/meter";
    let readings = vec![Reading {
        n: 1,
        topic: topic.to_owned(),
        payload: payload.as_bytes().to_vec(),
    }];
    let report =
        Publisher::publish_all(p.mosquitto.port(), readings, p.publisher(), secs(30)).await;
    report.assert_all_acked(1);
    wait_until("the reading in the relay's stream", secs(60), || async {
        match p.relay.read_stream().len() {
            0 => Err("not yet".to_owned()),
            _ => Ok(()),
        }
    })
    .await;
    let stream = p.relay.read_stream();
    let lines: Vec<String> = stream
        .files()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let want = format!(",\"data\":{stored}}}");
    assert!(
        lines[0].ends_with(&want),
        "stored {}\nwanted it to end with {want}",
        lines[0]
    );
    assert!(
        lines[0].contains("\"datacontenttype\":\"application/json\""),
        "{}",
        lines[0]
    );
}
