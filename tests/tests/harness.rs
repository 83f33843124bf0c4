//! The harness's own claims about the broker, checked against the real mosquitto: the
//! publisher's PUBACK bookkeeping, and the limits that keep an offline gateway's messages.

use std::collections::BTreeSet;
use std::time::Duration;

use pigeon_e2e::{Mosquitto, Publisher, PublisherOptions, TestDir, climate_readings, secs};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Connects a persistent-session subscriber, and returns the messages (by `n`) it receives
/// until it has `want` or `quiet` passes without one.
async fn receive(port: u16, subscribe: bool, want: usize, quiet: Duration) -> Vec<u64> {
    let mut mo = MqttOptions::new("e2e-offline-subscriber", "127.0.0.1", port);
    mo.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(mo, 100);
    if subscribe {
        client.subscribe("org/#", QoS::AtLeastOnce).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout(quiet, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if subscribe => break,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                got.push(v["n"].as_u64().unwrap());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
            Err(_) => break,
        }
    }
    // rumqttc acks automatically; let the last PUBACKs go out before disconnecting.
    client.disconnect().await.unwrap();
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_keeps_every_message_for_an_offline_persistent_subscriber() {
    // mosquitto's default max_queued_messages (1000) would drop most of these.
    const COUNT: u64 = 5_000;
    let dir = TestDir::new("harness-offline-subscriber");
    let mosquitto = Mosquitto::start(&dir).await;
    assert!(
        receive(mosquitto.port(), true, 1, secs(10))
            .await
            .is_empty()
    );

    let options = PublisherOptions {
        client_id: "e2e-harness-pub".to_string(),
        ..PublisherOptions::default()
    };
    let report = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..COUNT),
        options,
        secs(60),
    )
    .await;
    report.assert_all_acked(COUNT as usize);
    assert_eq!(report.submitted, COUNT as usize);
    assert_eq!(report.acked, (0..COUNT).collect::<BTreeSet<_>>());

    let got = receive(mosquitto.port(), false, COUNT as usize, secs(5)).await;
    assert_eq!(
        got.len(),
        COUNT as usize,
        "the broker kept {} of {COUNT} messages",
        got.len()
    );
    assert_eq!(got, (0..COUNT).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reports_what_was_not_acknowledged() {
    let dir = TestDir::new("harness-publisher-broker-gone");
    let mut mosquitto = Mosquitto::start(&dir).await;
    let options = PublisherOptions {
        client_id: "e2e-harness-pub2".to_string(),
        rate_per_sec: Some(2_000),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(mosquitto.port(), climate_readings(0..20_000), options);
    pigeon_e2e::wait_until("some PUBACKs", secs(30), || async {
        if publisher.acked_count() >= 500 {
            Ok(())
        } else {
            Err(format!("{}", publisher.acked_count()))
        }
    })
    .await;
    mosquitto.kill();
    let report = publisher.finish(secs(30)).await;
    assert!(
        report.error.is_some(),
        "no error reported after the broker died"
    );
    assert!(
        report.acked.len() >= 500 && report.acked.len() < 20_000,
        "{} acked",
        report.acked.len()
    );
    // Acknowledged readings are a prefix: the broker acks in order.
    assert_eq!(
        report.acked,
        (0..report.acked.len() as u64).collect::<BTreeSet<_>>()
    );
}
