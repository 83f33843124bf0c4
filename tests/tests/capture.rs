//! Capture: every event the relay accepts also lands in the bucket (garage) as
//! gzip-compressed JSON lines under `capture/tenant=…/type=…/date=…/hour=…/`, each
//! exactly once — also when the relay is SIGKILLed again and again while it writes rolls.

use std::collections::BTreeSet;

use pigeon_e2e::{
    Garage, Gateway, GatewayConfig, Mosquitto, Publisher, PublisherOptions, READING_TYPE, Relay,
    Stream, TestDir, capture_table, climate_readings, secs, set_gateway_tenant, wait_until,
};

const GW: &str = "pi-1";
const TOKEN: &str = "capture-token-0123456789";

/// The relay config: objects and capture in garage, small and frequent rolls.
fn capture_config(t: &mut toml::Table, garage: &Garage) {
    t.insert("objects".into(), garage.objects_table("5MiB").into());
    let capture = capture_table(&[("roll_bytes", "64KiB"), ("roll_age", "1s")]);
    t.insert("capture".into(), capture.into());
    set_gateway_tenant(t, 0, "acme");
}

/// Waits until the capture objects hold `n` events; returns them as a [`Stream`] (in key
/// order) after checking every key's partitions.
async fn captured(garage: &Garage, n: usize) -> Stream {
    let objects = garage.wait_for_capture(n).await;
    let mut events = Vec::new();
    for (key, evs) in objects {
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 6, "{key}");
        assert_eq!(parts[1], "tenant=acme", "{key}");
        assert_eq!(parts[2], format!("type={READING_TYPE}"), "{key}");
        assert!(
            parts[3].starts_with("date=20") && parts[3].len() == 15,
            "{key}"
        );
        assert!(
            parts[4].starts_with("hour=") && parts[4].len() == 7,
            "{key}"
        );
        assert!(
            parts[5].starts_with(&format!("{GW}.")) && parts[5].ends_with(".jsonl.gz"),
            "{key}"
        );
        for e in &evs {
            assert_eq!(e["type"], READING_TYPE, "{key}");
            assert_eq!(e["specversion"], "1.0", "{key}");
        }
        events.extend(evs);
    }
    Stream::from_events(events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_captured_once_across_relay_kills() {
    let dir = TestDir::new("capture-kills");
    let garage = Garage::start(&dir).await;
    let mosquitto = Mosquitto::start(&dir).await;
    let mut relay = Relay::start_with(&dir, &[(GW, TOKEN)], |t| capture_config(t, &garage)).await;
    let config = GatewayConfig::new(GW, TOKEN, &relay.url(), mosquitto.port());
    let _gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    let total = 12_000u64;
    let options = PublisherOptions {
        rate_per_sec: Some(1_000),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(mosquitto.port(), climate_readings(0..total), options);
    // SIGKILL the relay four times while rolls are being written (every second, 64 KiB).
    for k in 1..=4u64 {
        let want = (total * k / 8) as usize;
        wait_until("capture to make progress", secs(90), || async {
            let n = relay
                .metric_or_zero("pigeon_relay_capture_events_total")
                .await;
            // The counter starts again at each restart: compare with the stream.
            let stream = Stream::count_lines(&relay.stream_dir());
            if n > 0.0 && stream >= want {
                Ok(())
            } else {
                Err(format!(
                    "{n} captured since the last start, {stream} in the stream"
                ))
            }
        })
        .await;
        relay.kill();
        relay.restart().await;
    }
    // S3 goes away: the roll being written fails and stays recorded as pending; the relay
    // is killed like that, and the restarted relay writes that roll again (same range,
    // same keys) once S3 is back.
    garage.set_down(true);
    wait_until("a capture roll to be pending", secs(30), || async {
        let state = std::fs::read_to_string(relay.data_dir().join("state/capture.json"))
            .unwrap_or_default();
        if state.contains("\"roll\"") {
            Ok(())
        } else {
            Err(state)
        }
    })
    .await;
    relay.kill();
    garage.set_down(false);
    relay.restart().await;
    let report = publisher.finish(secs(90)).await;
    report.assert_all_acked(total as usize);

    let capture = captured(&garage, total as usize).await;
    if let Err(e) = capture.check_exactly_once("n", &report.acked) {
        panic!("capture does not hold every reading once: {e}");
    }
    // Capture holds exactly what the stream holds.
    let stream = relay.read_stream();
    let ids = |s: &Stream| -> BTreeSet<String> {
        s.events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(ids(&capture), ids(&stream));
    assert_eq!(capture.len(), stream.len());
    let state = std::fs::read_to_string(relay.data_dir().join("state/capture.json")).unwrap();
    assert!(
        !state.contains("\"roll\""),
        "a roll is still pending: {state}"
    );
    assert!(
        relay
            .proc()
            .log_text()
            .contains("Writing the capture roll a stop interrupted again"),
        "the restarted relay did not write the interrupted roll again"
    );
}
