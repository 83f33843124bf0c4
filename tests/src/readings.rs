//! Sensor readings the tests publish: deep topic hierarchies and JSON payloads that carry
//! a unique number `n`, so every reading can be found in the relay's stream.

use serde_json::{Value, json};

use crate::publisher::Reading;

/// The CloudEvent `type` the harness configures for its `org/#` subscription.
pub const READING_TYPE: &str = "com.example.sensor.reading";

/// A deep topic that varies with `n`: 4 floors × 25 rooms, e.g.
/// `org/contoso/site/berlin/building/41/floor/3/room/4/sensors/climate`.
pub fn climate_topic(n: u64) -> String {
    let room = 1 + n % 25;
    let floor = 1 + (n / 25) % 4;
    format!("org/contoso/site/berlin/building/41/floor/{floor}/room/{room}/sensors/climate")
}

/// A JSON payload with numbers, strings (some non-ASCII), booleans, null, an array and a
/// nested object, carrying `n`.
pub fn climate_payload(n: u64) -> Value {
    json!({
        "n": n,
        "temperature_c": 18.0 + (n % 100) as f64 / 10.0,
        "humidity_pct": 30 + n % 40,
        "ok": !n.is_multiple_of(7),
        "note": null,
        "tags": ["climate", "Zürich → Berlin ✓"],
        "sensor": {"model": "sht31", "serial": format!("S{:06}", n % 997), "offset_c": -0.25},
    })
}

/// Readings `range`, each on [`climate_topic`] with [`climate_payload`].
pub fn climate_readings(range: std::ops::Range<u64>) -> Vec<Reading> {
    range
        .map(|n| Reading {
            n,
            topic: climate_topic(n),
            payload: serde_json::to_vec(&climate_payload(n)).expect("serialize payload"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_vary_and_payloads_carry_n() {
        let topics: std::collections::BTreeSet<_> = (0..100).map(climate_topic).collect();
        assert_eq!(topics.len(), 100);
        assert_eq!(
            climate_topic(28),
            "org/contoso/site/berlin/building/41/floor/2/room/4/sensors/climate"
        );
        let r = &climate_readings(5..6)[0];
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["n"], 5);
        assert_eq!(v, climate_payload(5));
    }
}
