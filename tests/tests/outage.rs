//! The relay is unreachable or refuses the gateway: the gateway keeps taking readings from
//! the broker into its outbox and delivers them, exactly once, when the relay lets it.

use std::collections::BTreeSet;

use pigeon_e2e::{
    MosquittoOptions, Pipeline, Publisher, PublisherOptions, Stream, TOKEN, Token,
    climate_readings, fmt_count, secs, wait_until,
};

/// Waits until the broker has received `count` PUBACKs from the gateway since `since`
/// (its count before), i.e. the gateway committed that many messages to its outbox.
async fn wait_for_gateway_acks(p: &Pipeline, since: usize, count: usize) {
    let client_id = p.gateway.config().effective_client_id();
    let what = format!(
        "the gateway to acknowledge {} messages to the broker",
        fmt_count(count)
    );
    wait_until(&what, secs(60), || async {
        let acked = p.mosquitto.pubacks_from(&client_id) - since;
        if acked >= count {
            Ok(())
        } else {
            Err(format!("{} so far", fmt_count(acked)))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_outage_backlog_drains_exactly_once() {
    let options = MosquittoOptions {
        debug_log: true,
        ..MosquittoOptions::default()
    };
    let mut p = Pipeline::start_with("outage", options, |_| {}).await;
    let client_id = p.gateway.config().effective_client_id();

    // Up: a first thousand arrive.
    let report = Publisher::publish_all(
        p.mosquitto.port(),
        climate_readings(0..1_000),
        p.publisher(),
        secs(30),
    )
    .await;
    report.assert_all_acked(1_000);
    let mut expected = report.acked;
    p.relay.wait_for_readings("n", &expected, secs(60)).await;

    // Down: 5,000 more, published over 5 s.
    p.relay.stop().await;
    let lines_before = Stream::count_lines(&p.relay.stream_dir());
    let outbox_before = p.gateway.data_dir_bytes();
    let pubacks_before = p.mosquitto.pubacks_from(&client_id);
    let options = PublisherOptions {
        rate_per_sec: Some(1_000),
        ..p.publisher()
    };
    let report = Publisher::publish_all(
        p.mosquitto.port(),
        climate_readings(1_000..6_000),
        options,
        secs(60),
    )
    .await;
    report.assert_all_acked(5_000);
    // The gateway took them off the broker's hands (acked after committing them)...
    wait_for_gateway_acks(&p, pubacks_before, 5_000).await;
    p.gateway.proc().assert_running();
    // ...into its outbox, since nothing could go anywhere else.
    assert_eq!(
        Stream::count_lines(&p.relay.stream_dir()),
        lines_before,
        "the stream changed while the relay was down"
    );
    let outbox_after = p.gateway.data_dir_bytes();
    assert!(
        outbox_after > outbox_before,
        "the gateway's data directory did not grow while the relay was down ({outbox_before} → {outbox_after} bytes)"
    );
    expected.extend(report.acked);

    // Up again: the backlog drains.
    p.relay.restart().await;
    p.relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_loses_nothing_and_the_right_one_delivers_everything_once() {
    const COUNT: u64 = 2_000;
    let options = MosquittoOptions {
        debug_log: true,
        ..MosquittoOptions::default()
    };
    let mut p = Pipeline::start_with("wrong-token", options, |c| {
        c.token = Token::Inline("not-the-token".to_string());
    })
    .await;

    let report = Publisher::publish_all(
        p.mosquitto.port(),
        climate_readings(0..COUNT),
        p.publisher(),
        secs(30),
    )
    .await;
    report.assert_all_acked(COUNT as usize);
    let expected: BTreeSet<u64> = report.acked;
    wait_for_gateway_acks(&p, 0, COUNT as usize).await;

    // The gateway tries, and the relay refuses it (more than once: it retries).
    let refused = r#"pigeon_relay_ingest_requests_total{code="401"}"#;
    wait_until(
        "the relay to refuse the gateway twice",
        secs(30),
        || async {
            match p.relay.metric(refused).await? {
                Some(n) if n >= 2.0 => Ok(()),
                other => Err(format!("{refused} is {other:?}")),
            }
        },
    )
    .await;
    let stream = p.relay.read_stream();
    assert!(
        stream.is_empty(),
        "the relay accepted {} events with a wrong token",
        stream.len()
    );
    // Being refused is no reason to give up.
    p.gateway.proc().assert_running();

    // The right token, this time from a file.
    p.gateway.stop().await;
    let mut config = p.gateway.config().clone();
    config.token = Token::File(p.dir.join("relay-token"), TOKEN.to_string());
    p.gateway.restart_with(config);

    p.relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
}

/// A system without CA certificates (a minimal image, a broken ca-certificates) still
/// delivers to a plain-HTTP relay: the gateway needs no trust store for http://.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_system_ca_certificates_is_fine_for_a_plain_http_relay() {
    let dir = pigeon_e2e::TestDir::new("no-ca-certs");
    let empty = dir.join("no-certs");
    std::fs::create_dir(&empty).unwrap();
    let (file, certs) = (empty.join("none.pem"), empty.display().to_string());
    let mosquitto = pigeon_e2e::Mosquitto::start(&dir).await;
    let relay = pigeon_e2e::Relay::start(&dir, &[("pi-1", TOKEN)]).await;
    let config = pigeon_e2e::GatewayConfig::new("pi-1", TOKEN, &relay.url(), mosquitto.port());
    let env = [
        ("SSL_CERT_FILE", file.to_str().unwrap()),
        ("SSL_CERT_DIR", certs.as_str()),
    ];
    let mut gateway = pigeon_e2e::Gateway::start_with_env(&dir, config, &env);
    gateway.wait_subscribed(&mosquitto).await;
    let report = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..100),
        PublisherOptions::default(),
        secs(60),
    )
    .await;
    report.assert_all_acked(100);
    relay
        .assert_delivered_exactly_once(&report.acked, secs(60))
        .await;
}
