//! The gateway meets a broker that has been holding messages for it: far more than it
//! keeps in flight (`mqtt.max_pending`), one message above `mqtt.max_packet_size`, and
//! messages as large as the relay's `limits.max_event_bytes` allows, or larger.

use base64::Engine as _;
use pigeon_e2e::{
    GATEWAY_ID, Gateway, GatewayConfig, Mosquitto, Pipeline, Relay, TOKEN, TestDir, secs,
    wait_until,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Publishes one message at QoS 1 (packets of up to 2 MiB) and waits for the broker's
/// PUBACK.
async fn publish_one(port: u16, client_id: &str, topic: &str, payload: Vec<u8>) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(2 << 20, 2 << 20);
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue the message");
    loop {
        match el.poll().await.expect("publish the message") {
            Event::Incoming(Packet::PubAck(_)) => break,
            Event::Outgoing(Outgoing::Disconnect) => panic!("disconnected"),
            _ => {}
        }
    }
}

/// The gateway's dead letters and waiting records.
fn outbox_counts(gateway: &Gateway) -> (i64, i64) {
    let conn = rusqlite::Connection::open_with_flags(
        gateway.data_dir().join("outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the outbox");
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    };
    (count("dead_letters"), count("records"))
}

/// A queued backlog 40 times `max_pending` arrives when the gateway starts: it must
/// pause reading while it commits yet keep acknowledging, or it stalls for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_backlog_far_beyond_max_pending_drains_exactly_once() {
    let mut p = Pipeline::start_with("backlog-drain", Default::default(), |c| {
        c.mqtt_options.insert("max_pending".into(), 250.into());
    })
    .await;
    p.gateway.stop().await;
    let expected = p.publish(0..10_000).await;
    p.gateway.restart();
    p.relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
    // It stops promptly, too: nothing is stuck behind an acknowledgement.
    p.gateway.stop().await;
    assert!(
        p.gateway.log_text().contains("pigeon-gateway stopped."),
        "the gateway did not stop cleanly"
    );
}

/// One message bigger than `max_packet_size` between good ones: it is dropped with an
/// error naming the topic and the setting, and acknowledged so the rest keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dropped_with_a_clear_error_and_the_rest_flow() {
    let p = Pipeline::start_with("backlog-oversized", Default::default(), |c| {
        c.mqtt_options
            .insert("max_packet_size".into(), "64KiB".into());
    })
    .await;
    let mut expected = p.publish(0..100).await;
    publish_one(
        p.mosquitto.port(),
        "big-publisher",
        "org/cameras/big",
        vec![b'x'; 200 * 1024],
    )
    .await;
    expected.extend(p.publish(100..200).await);
    p.relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;
    let log = wait_until(
        "the gateway logs the oversized message",
        secs(10),
        || async {
            let log = p.gateway.log_text();
            if log.contains("larger than mqtt.max_packet_size") {
                Ok(log)
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    assert!(log.contains("org/cameras/big"), "the error names the topic");
}

/// Issue 24: with both programs' defaults, a binary message as large as
/// `mqtt.max_packet_size` lets through (1 MiB; its event is 1.33 MiB of JSON, base64)
/// reaches the relay. With the relay's old default `limits.max_event_bytes` of 1 MiB it
/// was acknowledged to the broker and then dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_24_a_binary_message_of_the_default_max_packet_size_reaches_the_relay() {
    let p = Pipeline::start("issue-24-largest").await;
    let topic = "org/cameras/blob";
    // A PUBLISH's remaining length: topic length (2), topic, packet id (2), payload.
    let payload: Vec<u8> = (0..(1usize << 20) - 4 - topic.len())
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let mut expected = p.publish(0..50).await;
    publish_one(p.mosquitto.port(), "e2e-blob", topic, payload.clone()).await;
    expected.extend(p.publish(50..100).await);

    let stream = p
        .relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;
    let (dead, _) = outbox_counts(&p.gateway);
    let blobs: Vec<_> = stream
        .events()
        .iter()
        .filter(|e| e["subject"] == topic)
        .collect();
    assert_eq!(
        blobs.len(),
        1,
        "the 1 MiB message is not at the relay once; {dead} dead letter(s) at the gateway"
    );
    let data = base64::engine::general_purpose::STANDARD
        .decode(blobs[0]["data_base64"].as_str().expect("data_base64"))
        .expect("base64");
    assert!(data == payload, "the payload arrived changed");
    assert_eq!(dead, 0);
}

/// Issue 24: a message whose event the relay would refuse is refused at ingest, like one
/// over `mqtt.max_packet_size`: an ERROR naming `relay.max_event_bytes`, counted,
/// acknowledged so the rest flow, never committed (no dead letter). Here a topic of
/// characters JSON escapes (`"` → `\"`), which the check of `mqtt.max_packet_size`
/// against `relay.max_event_bytes` cannot foresee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_24_a_message_whose_event_is_over_relay_max_event_bytes_is_refused_at_ingest() {
    let dir = TestDir::new("issue-24-refused");
    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start_with(&dir, &[(GATEWAY_ID, TOKEN)], |t| {
        let mut limits = toml::Table::new();
        limits.insert("max_event_bytes".into(), "64KiB".into());
        t.insert("limits".into(), limits.into());
    })
    .await;
    let mut config = GatewayConfig::new(GATEWAY_ID, TOKEN, &relay.url(), mosquitto.port());
    config
        .relay_options
        .insert("max_event_bytes".into(), "64KiB".into());
    config
        .mqtt_options
        .insert("max_packet_size".into(), "47KiB".into());
    let gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    let p = Pipeline {
        gateway,
        relay,
        mosquitto,
        dir,
    };

    // A 40 KB topic (the packet fits 47 KiB): 80 KB as the event's subject.
    let topic = format!("org/{}", "\"".repeat(40_000));
    let mut expected = p.publish(0..100).await;
    publish_one(p.mosquitto.port(), "e2e-quotes", &topic, b"21.5".to_vec()).await;
    expected.extend(p.publish(100..200).await);

    let stream = p
        .relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;
    assert!(
        !stream.events().iter().any(|e| e["subject"] == topic),
        "the relay got it"
    );
    let log = p.gateway.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("larger than relay.max_event_bytes"))
        .unwrap_or_else(|| {
            panic!(
                "no ERROR about relay.max_event_bytes; (dead letters, waiting) = {:?}",
                outbox_counts(&p.gateway)
            )
        });
    assert!(
        line.contains("ERROR") && line.contains("topic=\"org/\\\""),
        "{line}"
    );
    assert!(line.contains("limit=65536"), "{line}");
    assert_eq!(
        p.gateway
            .metric("pigeon_gateway_mqtt_oversized_total")
            .await
            .unwrap(),
        Some(1.0)
    );
    assert_eq!(outbox_counts(&p.gateway), (0, 0), "(dead letters, waiting)");
}
