//! `relay.max_attempts`: a relay that answers, but fails one event every time (a
//! fault-injecting HTTP proxy answers `500` to any request carrying reading n = 42). The
//! gateway sends the failing batch's events one by one to find it, moves it to the
//! dead-letter table with the reason once it has failed `max_attempts` times, and the
//! readings around it flow on. Without the limit it would be retried for ever.

use std::collections::BTreeSet;

use pigeon_e2e::{
    FailingProxy, Gateway, GatewayConfig, Mosquitto, Publisher, Relay, TestDir, climate_readings,
    describe, secs, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_relay_keeps_failing_is_dead_lettered_after_max_attempts() {
    let dir = TestDir::new("retry-limit");
    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start(&dir, &[("pi-1", "retry-limit-token")]).await;
    // The readings' JSON is `{"n":42,…}`: the comma keeps 420–429 out.
    let proxy = FailingProxy::start(relay.port(), "\"n\":42,").await;
    let mut config = GatewayConfig::new(
        "pi-1",
        "retry-limit-token",
        &format!("http://127.0.0.1:{}", proxy.port()),
        mosquitto.port(),
    );
    for (k, v) in [
        ("compression", toml::Value::from("none")),
        ("max_attempts", 3.into()),
        ("backoff_initial", "20ms".into()),
        ("backoff_max", "100ms".into()),
    ] {
        config.relay_options.insert(k.into(), v);
    }
    let gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    let report = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..200),
        Default::default(),
        secs(60),
    )
    .await;
    report.assert_all_acked(200);
    let others: BTreeSet<u64> = (0..200).filter(|n| *n != 42).collect();
    relay.wait_for_readings("n", &others, secs(60)).await;

    let listed = wait_until("reading 42 in the dead-letter table", secs(30), || async {
        let out = gateway.command(&["dead-letter", "list", "--json"]).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {}", describe(&out)))?;
        if v["total"] == 1 {
            Ok(v)
        } else {
            Err(format!("{} dead letters", v["total"]))
        }
    })
    .await;
    let letter = &listed["dead_letters"][0];
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("relay.max_attempts") && reason.contains("injected failure"),
        "{reason}"
    );
    assert!(
        letter["preview"].as_str().unwrap().contains("\"n\":42"),
        "{letter}"
    );
    // The relay never had it; everything else arrived once.
    relay.assert_delivered_exactly_once(&others, secs(30)).await;
    assert!(
        proxy.failed() >= 3,
        "the proxy failed {} requests",
        proxy.failed()
    );
    assert!(
        gateway
            .log_text()
            .contains("sending its events one by one to find the one it fails on"),
        "the gateway did not say it was isolating the event"
    );
}
