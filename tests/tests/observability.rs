//! What the gateway says about itself: heartbeat events at the relay, `/metrics`,
//! `/status`, `/ready`, and `pigeon-gateway status` for the person at the Pi — while it
//! runs and after it stopped.

use std::collections::BTreeSet;

use pigeon_e2e::{
    GATEWAY_ID, MosquittoOptions, Pipeline, Publisher, READING_TYPE, Reading, Subscription,
    climate_readings, describe, secs, wait_until,
};
use serde_json::{Value, json};

const ALARM_FILTER: &str = "org/+/site/+/alarms/#";
const ALARM_TYPE: &str = "com.example.alarm";

/// Alarms `range` on `org/contoso/site/berlin/alarms/smoke/<n>`, each carrying `n`.
fn alarms(range: std::ops::Range<u64>) -> Vec<Reading> {
    range
        .map(|n| Reading {
            n,
            topic: format!("org/contoso/site/berlin/alarms/smoke/{n}"),
            payload: serde_json::to_vec(&json!({"n": n, "smoke": true})).unwrap(),
        })
        .collect()
}

/// A pipeline whose gateway has an alarm subscription in front of `org/#`.
async fn pipeline(name: &str) -> Pipeline {
    Pipeline::start_with(name, MosquittoOptions::default(), |c| {
        c.subscriptions.insert(
            0,
            Subscription {
                filter: ALARM_FILTER.into(),
                qos: 1,
                event_type: ALARM_TYPE.into(),
                ttl: None,
            },
        );
    })
    .await
}

/// Waits until the gateway's `/metrics` has `sample` at `want`.
async fn wait_metric(p: &Pipeline, sample: &str, want: f64) {
    wait_until(&format!("{sample} = {want}"), secs(60), || async {
        match p.gateway.metric(sample).await? {
            Some(v) if v == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_arrive_at_the_relay_with_plausible_values() {
    let p = Pipeline::start_with("heartbeats", MosquittoOptions::default(), |c| {
        c.health_interval = Some("1s".into());
    })
    .await;
    let source = format!("/gateways/{GATEWAY_ID}/health");
    let beats = wait_until("three heartbeats in the stream", secs(60), || async {
        let beats: Vec<Value> = p
            .relay
            .read_stream()
            .events()
            .iter()
            .filter(|e| e["source"] == source.as_str())
            .cloned()
            .collect();
        if beats.len() >= 3 {
            Ok(beats)
        } else {
            Err(format!("{} so far", beats.len()))
        }
    })
    .await;
    let mut uptimes = Vec::new();
    for e in &beats {
        assert_eq!(e["type"], "io.pigeon.gateway.heartbeat", "{e}");
        assert_eq!(e["datacontenttype"], "application/json", "{e}");
        assert!(e["sequence"].is_string() && e["time"].is_string(), "{e}");
        let d = &e["data"];
        let positive = |k: &str| d[k].as_u64().is_some_and(|v| v > 0);
        for k in [
            "memory_total_bytes",
            "memory_used_bytes",
            "disk_total_bytes",
            "disk_free_bytes",
            "uptime_seconds",
            "cpu_count",
        ] {
            assert!(positive(k), "{k} is not a positive number: {d}");
        }
        assert!(
            d["memory_used_bytes"].as_u64() <= d["memory_total_bytes"].as_u64()
                && d["disk_free_bytes"].as_u64() <= d["disk_total_bytes"].as_u64(),
            "{d}"
        );
        let cpu = d["cpu_percent"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&cpu), "cpu_percent {cpu}: {d}");
        assert!(d["load_1m"].as_f64().is_some_and(|l| l >= 0.0), "{d}");
        assert!(d["outbox_depth"].is_u64(), "outbox_depth: {d}");
        assert!(d["outbox_dead_letters"].is_u64(), "{d}");
        assert!(
            d["temperature_c"].is_null() || d["temperature_c"].is_f64(),
            "{d}"
        );
        assert_eq!(d["mqtt_connected"], true, "{d}");
        assert_eq!(d["version"], env!("CARGO_PKG_VERSION"), "{d}");
        uptimes.push(
            d["process_uptime_seconds"]
                .as_u64()
                .expect("process uptime"),
        );
    }
    assert!(
        uptimes.windows(2).all(|w| w[0] <= w[1]),
        "heartbeats out of order: {uptimes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_and_the_status_command_match_what_was_published() {
    let p = pipeline("metrics").await;
    let alarm_report = Publisher::publish_all(
        p.mosquitto.port(),
        alarms(10_000..10_020),
        p.publisher(),
        secs(30),
    )
    .await;
    alarm_report.assert_all_acked(20);
    let readings = Publisher::publish_all(
        p.mosquitto.port(),
        climate_readings(0..300),
        p.publisher(),
        secs(30),
    )
    .await;
    readings.assert_all_acked(300);
    let expected: BTreeSet<u64> = readings.acked.union(&alarm_report.acked).copied().collect();
    p.relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;

    // /metrics: the counts are what was published (no heartbeats in this pipeline).
    wait_metric(&p, "pigeon_gateway_outbox_records", 0.0).await;
    wait_metric(&p, "pigeon_gateway_events_delivered_total", 320.0).await;
    let (code, body) = p.gateway.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let metric = |s: &str| pigeon_e2e::metric_value(&body, s);
    for (sample, want) in [
        (
            format!(
                "pigeon_gateway_mqtt_subscription_records_total{{filter=\"{ALARM_FILTER}\",type=\"{ALARM_TYPE}\"}}"
            ),
            20.0,
        ),
        (
            format!(
                "pigeon_gateway_mqtt_subscription_records_total{{filter=\"org/#\",type=\"{READING_TYPE}\"}}"
            ),
            300.0,
        ),
        (
            "pigeon_gateway_source_records_total{source=\"mqtt\"}".into(),
            320.0,
        ),
        (
            "pigeon_gateway_source_records_total{source=\"health\"}".into(),
            0.0,
        ),
        ("pigeon_gateway_mqtt_unmatched_records_total".into(), 0.0),
        ("pigeon_gateway_events_duplicate_total".into(), 0.0),
        ("pigeon_gateway_events_dead_lettered_total".into(), 0.0),
        ("pigeon_gateway_upload_failures_total".into(), 0.0),
        ("pigeon_gateway_outbox_dead_letters".into(), 0.0),
        ("pigeon_gateway_outbox_bytes".into(), 0.0),
        ("pigeon_gateway_relay_reachable".into(), 1.0),
        ("pigeon_gateway_mqtt_connected".into(), 1.0),
        ("pigeon_gateway_ready".into(), 1.0),
        ("pigeon_gateway_heartbeats_total".into(), 0.0),
    ] {
        assert_eq!(metric(&sample), Some(want), "{sample} in\n{body}");
    }
    let requests = metric("pigeon_gateway_upload_requests_total").unwrap_or(0.0);
    let answered = metric("pigeon_gateway_upload_successes_total").unwrap_or(0.0);
    assert!(requests >= 1.0 && answered == requests, "{body}");
    assert!(metric("pigeon_gateway_upload_bytes_total").unwrap_or(0.0) > 0.0);
    assert!(metric("pigeon_gateway_mqtt_messages_received_total").unwrap_or(0.0) >= 320.0);
    assert!(metric("pigeon_gateway_last_upload_timestamp_seconds").unwrap_or(0.0) > 1.6e9);
    assert!(metric("pigeon_gateway_disk_free_bytes").unwrap_or(0.0) > 0.0);

    // /live, /ready, /status.
    assert_eq!(p.gateway.get("/live").await.unwrap().0, 200);
    assert_eq!(
        p.gateway.get("/ready").await.unwrap(),
        (200, "ready\n".into())
    );
    let (code, body) = p.gateway.get("/status").await.unwrap();
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["gateway"], GATEWAY_ID);
    assert_eq!(status["state"], "running");
    assert_eq!(status["outbox"]["waiting"], 0);
    assert_eq!(status["outbox"]["dead_letters"], 0);
    assert!(status["disk"]["free_bytes"].as_u64().unwrap_or(0) > 0);
    let live = &status["live"];
    assert_eq!(live["ready"], true);
    assert_eq!(live["mqtt_connected"], true);
    assert_eq!(live["relay_reachable"], true);
    assert_eq!(live["events_delivered"], 320);
    assert_eq!(
        live["subscriptions"],
        json!([
            {"filter": ALARM_FILTER, "type": ALARM_TYPE, "records": 20},
            {"filter": "org/#", "type": READING_TYPE, "records": 300},
        ])
    );
    assert_eq!(live["last_error"], Value::Null, "{status}");

    // `pigeon-gateway status` for a person, and for a script.
    let out = p.gateway.status_command(&[]).await;
    let shown = describe(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    let broker = format!("connected to 127.0.0.1:{}", p.mosquitto.port());
    for expected in [
        "pigeon-gateway pi-1: running and taking data",
        broker.as_str(),
        "Relay          reachable at http://127.0.0.1:",
        "Waiting        nothing: everything has been delivered",
        "Delivered      320 events since the start",
        "Dead letters   none",
        "Last error     none since the start",
    ] {
        assert!(shown.contains(expected), "missing {expected:?} in {shown}");
    }
    let row = |filter: &str, n: &str| {
        shown
            .lines()
            .any(|l| l.trim_start().starts_with(filter) && l.split_whitespace().any(|w| w == n))
    };
    assert!(row(ALARM_FILTER, "20") && row("org/#", "300"), "{shown}");
    let out = p.gateway.status_command(&["--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["live"]["subscriptions"], live["subscriptions"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_backlog_while_the_relay_is_down_and_after_the_gateway_stopped() {
    let mut p = pipeline("status-stopped").await;
    p.relay.stop().await;
    let report = Publisher::publish_all(
        p.mosquitto.port(),
        climate_readings(0..50),
        p.publisher(),
        secs(30),
    )
    .await;
    report.assert_all_acked(50);
    wait_metric(&p, "pigeon_gateway_outbox_records", 50.0).await;
    wait_metric(&p, "pigeon_gateway_relay_reachable", 0.0).await;
    // Buffering is the gateway doing its job: still ready.
    assert_eq!(p.gateway.get("/ready").await.unwrap().0, 200);

    let out = p.gateway.status_command(&[]).await;
    let shown = describe(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    for expected in [
        "running and taking data",
        "Relay          NOT reachable at http://127.0.0.1:",
        "Waiting        50 events (",
        "the oldest received",
        "Last error     ",
        "Cannot deliver to the relay",
    ] {
        assert!(shown.contains(expected), "missing {expected:?} in {shown}");
    }

    // Stopped: the same backlog, read from the outbox; exit code 3.
    p.gateway.stop().await;
    let out = p.gateway.status_command(&[]).await;
    let shown = describe(&out);
    assert_eq!(out.status.code(), Some(3), "{shown}");
    for expected in [
        "pigeon-gateway pi-1: NOT RUNNING",
        "nothing answers at http://127.0.0.1:",
        "Waiting        50 events (",
        "Dead letters   none",
        "Disk           ",
    ] {
        assert!(shown.contains(expected), "missing {expected:?} in {shown}");
    }
    let out = p.gateway.status_command(&["--json"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "stopped");
    assert_eq!(json["outbox"]["waiting"], 50);
    assert_eq!(json["live"], Value::Null);

    // Nothing was lost on the way.
    p.relay.restart().await;
    p.gateway.restart();
    p.relay
        .assert_delivered_exactly_once(&report.acked, secs(60))
        .await;
}
