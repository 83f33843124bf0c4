//! The gateway meets a broker that has been holding messages for it: far more than it
//! keeps in flight (`mqtt.max_pending`), and one message above `mqtt.max_packet_size`.

use pigeon_e2e::{Pipeline, secs, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

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

    let mut opts = MqttOptions::new("big-publisher", "127.0.0.1", p.mosquitto.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish(
            "org/cameras/big",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; 200 * 1024],
        )
        .await
        .expect("queue the big message");
    loop {
        match el.poll().await.expect("publish the big message") {
            Event::Incoming(Packet::PubAck(_)) => break,
            Event::Outgoing(Outgoing::Disconnect) => panic!("disconnected"),
            _ => {}
        }
    }

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
