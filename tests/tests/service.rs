//! Running under systemd (`Type=notify`, `WatchdogSec=`): both binaries say `READY=1`,
//! ping the watchdog at half of `WATCHDOG_USEC`, and say `STOPPING=1` on SIGTERM; a
//! gateway stopped in the middle of an upload the relay never answers still exits
//! within its shutdown deadline, and after a restart every reading arrives exactly once.
//!
//! The test binds the notification socket itself (a file for the relay, an abstract
//! `@name` for the gateway, the two kinds systemd uses) and reads what arrives.

use std::collections::BTreeSet;
use std::time::Duration;

use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, NotifySocket, Proxy, Publisher, Relay, TestDir,
    climate_readings, secs, wait_until,
};

/// `WATCHDOG_USEC` the tests set: pings are due every second.
const WATCHDOG_USEC: &str = "2000000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_notifies_systemd_and_a_sigterm_mid_upload_ends_in_time_losing_nothing() {
    const SHUTDOWN_TIMEOUT_SECS: u64 = 3;
    let dir = TestDir::new("gateway-notify");
    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start(&dir, &[("pi-1", "tok")]).await;
    // The gateway talks to the relay through a proxy that can hold its requests.
    let proxy = Proxy::start(relay.port()).await;
    let mut config = GatewayConfig::new(
        "pi-1",
        "tok",
        &format!("http://127.0.0.1:{}", proxy.port()),
        mosquitto.port(),
    );
    config.shutdown_timeout = Some(format!("{SHUTDOWN_TIMEOUT_SECS}s"));
    let mut notify = NotifySocket::bind_abstract(&format!(
        "pigeon-e2e-gateway-{}-{}",
        std::process::id(),
        mosquitto.port()
    ));
    let env = [
        ("NOTIFY_SOCKET", notify.env_value()),
        ("WATCHDOG_USEC", WATCHDOG_USEC),
    ];
    let mut gateway = Gateway::start_with_env(&dir, config, &env);
    gateway.wait_subscribed(&mosquitto).await;

    notify.wait_for("READY=1", 1, secs(30)).await;
    notify.wait_for("WATCHDOG=1", 2, secs(30)).await;
    let first = notify.messages()[0].clone();
    assert!(
        first.starts_with("READY=1\nSTATUS="),
        "the first message should be READY=1 with a status line: {first:?}"
    );
    assert!(
        notify.messages().iter().all(|m| !m.contains("STOPPING=1")),
        "{:?}",
        notify.messages()
    );

    // Some readings flow through.
    let a = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..500),
        Default::default(),
        secs(30),
    )
    .await;
    a.assert_all_acked(500);
    relay.wait_for_readings("n", &a.acked, secs(60)).await;

    // Now the relay "hangs": the proxy keeps the gateway's next request to itself.
    proxy.hold_client_bytes(true);
    let requests = "pigeon_gateway_upload_requests_total";
    let before = gateway.metric(requests).await.unwrap().unwrap_or(0.0);
    let b = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(500..1_000),
        Default::default(),
        secs(30),
    )
    .await;
    b.assert_all_acked(500);
    wait_until("an upload in flight", secs(30), || async {
        let sent = gateway.metric(requests).await?.unwrap_or(0.0);
        let committed = gateway
            .metric(r#"pigeon_gateway_source_records_total{source="mqtt"}"#)
            .await?
            .unwrap_or(0.0);
        if sent > before && committed >= 1_000.0 {
            Ok(())
        } else {
            Err(format!(
                "{requests} {sent} (was {before}), {committed} committed"
            ))
        }
    })
    .await;

    // SIGTERM: it must say STOPPING=1 and exit, cleanly, once the deadline has passed.
    let status = gateway
        .proc()
        .terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS) + secs(5))
        .await;
    assert!(status.success(), "the gateway exited with {status}");
    notify.wait_for("STOPPING=1", 1, secs(5)).await;
    let log = gateway.proc().log_text();
    assert!(
        log.contains("did not answer before the shutdown deadline"),
        "the stop did not wait for the held upload; log:\n{log}"
    );

    // The relay answers again; restarted, the gateway delivers everything exactly once.
    proxy.cut_all();
    proxy.hold_client_bytes(false);
    gateway.restart();
    notify.wait_for("READY=1", 2, secs(30)).await;
    let expected: BTreeSet<u64> = a.acked.union(&b.acked).copied().collect();
    relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_notifies_systemd_ready_watchdog_and_stopping() {
    let dir = TestDir::new("relay-notify");
    let mut notify = NotifySocket::bind_path(&dir.join("notify.sock"));
    let env = [
        ("NOTIFY_SOCKET", notify.env_value()),
        ("WATCHDOG_USEC", WATCHDOG_USEC),
    ];
    let mut relay = Relay::start_with_env(&dir, &[("pi-1", "tok")], |_| {}, &env).await;
    notify.wait_for("READY=1", 1, secs(30)).await;
    notify.wait_for("WATCHDOG=1", 2, secs(30)).await;
    let ready = &notify.messages()[0];
    assert!(
        ready.starts_with("READY=1\nSTATUS=listening on 127.0.0.1:"),
        "{ready:?}"
    );
    relay.stop().await;
    notify.wait_for("STOPPING=1", 1, secs(5)).await;
}
