//! The crash window between the outbox commit and the broker receiving the PUBACK.
//!
//! A proxy between gateway and broker holds the gateway's PUBACKs while it commits and
//! uploads a batch of readings; then the gateway is SIGKILLed and the held acks are
//! dropped, exactly as if the gateway had died right after its commit. The broker
//! re-sends every one of those messages (DUP set, same packet ids) after the restart;
//! the gateway must recognise them and not send them to the relay a second time.

use std::collections::BTreeSet;

use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, MosquittoOptions, Proxy, Publisher, Relay, Stream, TestDir,
    climate_readings, secs, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_puback_stores_no_duplicates() {
    const HELD: u64 = 300;
    const AFTER: u64 = 200;
    let dir = TestDir::new("redelivery");
    let mosquitto = Mosquitto::start_with(
        &dir,
        MosquittoOptions {
            debug_log: true,
            ..MosquittoOptions::default()
        },
    )
    .await;
    let relay = Relay::start(&dir, &[("pi-1", "tok")]).await;
    let proxy = Proxy::start(mosquitto.port()).await;
    let config = GatewayConfig::new("pi-1", "tok", &relay.url(), proxy.port());
    let client_id = config.effective_client_id();
    let mut gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    // The gateway receives, commits and uploads these, but its PUBACKs never arrive.
    proxy.hold_client_bytes(true);
    let first = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..HELD),
        Default::default(),
        secs(60),
    )
    .await;
    first.assert_all_acked(HELD as usize);
    let stream_dir = relay.stream_dir();
    wait_until("the held readings in the stream", secs(60), || async {
        let lines = Stream::count_lines(&stream_dir);
        if lines >= HELD as usize {
            Ok(())
        } else {
            Err(format!("{lines} lines"))
        }
    })
    .await;
    assert_eq!(
        mosquitto.pubacks_from(&client_id),
        0,
        "the proxy let PUBACKs through"
    );

    // Die right after the commit: the acks are lost with the connection.
    gateway.kill();
    proxy.cut_all();
    proxy.hold_client_bytes(false);
    gateway.restart();

    // The broker re-sends what it never got an ack for, flagged as duplicates.
    wait_until(
        "the broker's re-delivery with DUP set",
        secs(60),
        || async {
            let needle = format!("Sending PUBLISH to {client_id} (d1,");
            let resent = mosquitto
                .log_text()
                .lines()
                .filter(|l| l.contains(&needle))
                .count();
            if resent >= HELD as usize {
                Ok(())
            } else {
                Err(format!("{resent} re-sent so far"))
            }
        },
    )
    .await;

    let second = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(HELD..HELD + AFTER),
        Default::default(),
        secs(60),
    )
    .await;
    let expected: BTreeSet<u64> = first.acked.union(&second.acked).copied().collect();
    assert_eq!(expected.len(), (HELD + AFTER) as usize);
    relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;
    // And the broker now has its acks for everything, re-deliveries included.
    wait_until(
        "PUBACKs for the re-delivered messages",
        secs(30),
        || async {
            let acks = mosquitto.pubacks_from(&client_id);
            if acks >= (HELD + AFTER) as usize {
                Ok(())
            } else {
                Err(format!("{acks} PUBACKs"))
            }
        },
    )
    .await;
}
