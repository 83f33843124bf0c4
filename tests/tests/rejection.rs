//! An event the relay refuses for good must not block the ones behind it, and must not
//! be dropped silently either: the gateway keeps it in its dead-letter table.

use std::collections::BTreeSet;

use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, Publisher, Reading, Relay, TestDir, climate_readings, secs,
    wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_relay_rejects_is_dead_lettered_and_the_rest_flow_on() {
    let dir = TestDir::new("rejection");
    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start_with(&dir, &[("pi-1", "tok")], |t| {
        let mut limits = toml::Table::new();
        limits.insert("max_event_bytes".into(), "4KiB".into());
        t.insert("limits".into(), limits.into());
    })
    .await;
    let config = GatewayConfig::new("pi-1", "tok", &relay.url(), mosquitto.port());
    let gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    // 500 ordinary readings with one oversized one (n = 250) in the middle of them.
    let mut readings = climate_readings(0..500);
    readings[250] = Reading {
        n: 250,
        topic: readings[250].topic.clone(),
        payload: format!("{{\"n\":250,\"blob\":\"{}\"}}", "x".repeat(8 * 1024)).into_bytes(),
    };
    let report =
        Publisher::publish_all(mosquitto.port(), readings, Default::default(), secs(60)).await;
    report.assert_all_acked(500);

    let expected: BTreeSet<u64> = (0..500).filter(|n| *n != 250).collect();
    relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;

    // The oversized one is in the dead-letter table with the relay's reason, and nothing
    // is left waiting in the outbox.
    let db = gateway.data_dir().join("outbox.db");
    let (dead, reason, pending) = wait_until("the dead letter", secs(30), || async {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| e.to_string())?;
        let pending: i64 = conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        let dead: Vec<(Vec<u8>, String)> = conn
            .prepare("SELECT data, reason FROM dead_letters")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()
            })
            .map_err(|e| e.to_string())?;
        match dead.as_slice() {
            [(data, reason)] => Ok((data.clone(), reason.clone(), pending)),
            other => Err(format!("{} dead letters, {pending} pending", other.len())),
        }
    })
    .await;
    let dead: serde_json::Value =
        serde_json::from_slice(&dead).expect("dead letter is the JSON reading");
    assert_eq!(dead["n"], 250);
    assert!(
        reason.contains("bytes") || reason.contains("large"),
        "reason: {reason}"
    );
    assert_eq!(pending, 0, "records left in the outbox");
}
