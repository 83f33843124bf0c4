//! The cost of writing an event's attributes in one fixed order (`ingest::Attributes`,
//! extensions sorted by name, cb33e3b) against the CloudEvents SDK's own serializer
//! (extensions in hash-map order), side by side in one run. Figures, not pass/fail:
//!   cargo bench -p pigeon-relay --bench attributes
//! docs/benchmarks.md records them.

use std::time::Instant;

use axum::http::HeaderMap;
use pigeon_relay::ingest::{self, Attributes, Mode};

fn main() {
    let body = br#"{"specversion":"1.0","id":"01a251e8-8e43-7000-8000-3fc862f6eb9d","type":"io.pigeon.sensor.reading","source":"/gateways/demo-pi/mqtt","datacontenttype":"application/json","subject":"sensors/demo/room1","time":"2026-12-07T19:08:44.995498Z","producerid":"9f0636c2-74a7-4a33-ab9a-871bd6f1af3b","sequence":"00000000000000000003","data":{"t":21.5}}"#;
    let parsed = ingest::parse_events(Mode::Structured, &HeaderMap::new(), body, 1)
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let n = 2_000_000;
    for round in 0..3 {
        let t = Instant::now();
        let mut bytes = 0;
        for _ in 0..n {
            bytes += serde_json::to_vec(std::hint::black_box(&parsed.event))
                .unwrap()
                .len();
        }
        let sdk = t.elapsed();
        let t = Instant::now();
        for _ in 0..n {
            bytes += serde_json::to_vec(&Attributes(std::hint::black_box(&parsed.event)))
                .unwrap()
                .len();
        }
        let ours = t.elapsed();
        println!(
            "round {round}: SDK {:.0} ns/event, Attributes {:.0} ns/event, ratio {:.2} ({bytes})",
            sdk.as_nanos() as f64 / n as f64,
            ours.as_nanos() as f64 / n as f64,
            ours.as_secs_f64() / sdk.as_secs_f64()
        );
    }
}
