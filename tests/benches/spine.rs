//! Benchmarks of the spine, MQTT → gateway outbox → relay stream files, with the real
//! binaries (release builds) and a real mosquitto on loopback. Prints figures; asserts
//! nothing about speed. Run with `scripts/bench` (it builds the release binaries first).
//!
//! Every scenario preloads the broker: the subscriber's persistent session is created,
//! the subscriber goes away, N readings are published and queued by the broker, and then
//! the subscriber comes back. The rate measured is how fast the queue drains, so the
//! publisher is not competing for the 2 cores while we measure.
//!
//! * baseline — a plain rumqttc subscriber (QoS 1, automatic acks): what mosquitto can
//!   deliver to one client on this machine.
//! * gateway → outbox — pigeon-gateway with the relay down: acks after each group commit.
//! * end to end — pigeon-gateway + pigeon-relay: until every reading is in the stream files.
//! * RSS — the gateway's resident memory idle, and its peak under the load above.
//! * disk writes — bytes the gateway wrote to storage (`/proc/PID/io`) per payload byte:
//!   SD cards wear out, so this is what the outbox costs them.
//!
//! `PIGEON_BENCH_N` sets N (default 200000).

use std::path::Path;
use std::time::{Duration, Instant};

use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, MosquittoOptions, Publisher, PublisherOptions, Relay,
    Stream, TestDir, climate_readings, rss_kib, write_bytes,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const GATEWAY: &str = "bench-gw";
const TOKEN: &str = "bench-token";

fn n() -> usize {
    std::env::var("PIGEON_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = n();
    println!("# Pigeon spine benchmark: {n} readings of ~250 B JSON on deep topics, QoS 1\n");
    let baseline = baseline(n).await;
    println!(
        "mosquitto → plain subscriber (baseline):   {:>9.0} msgs/s",
        baseline
    );
    let (ingest, ingest_rss_kib, idle_rss_kib, ingest_written) = gateway_ingest(n).await;
    println!(
        "mosquitto → gateway outbox (ack after commit): {:>5.0} msgs/s  ({:.0}% of baseline)",
        ingest,
        100.0 * ingest / baseline
    );
    let (e2e, e2e_rss_kib, e2e_written) = end_to_end(n).await;
    println!(
        "mosquitto → gateway → relay stream files:  {:>9.0} readings/s",
        e2e
    );
    println!(
        "gateway RSS idle:                          {:>9.1} MB",
        idle_rss_kib as f64 / 1024.0
    );
    println!(
        "gateway peak RSS, ingest (relay down):     {:>9.1} MB",
        ingest_rss_kib as f64 / 1024.0
    );
    println!(
        "gateway peak RSS, end to end:              {:>9.1} MB",
        e2e_rss_kib as f64 / 1024.0
    );
    let payload = payload_bytes(n) as f64;
    println!(
        "gateway disk writes per payload byte, ingest:     {:>5.2} ({:.1} MB for {:.1} MB of payload)",
        ingest_written as f64 / payload,
        ingest_written as f64 / 1e6,
        payload / 1e6
    );
    println!(
        "gateway disk writes per payload byte, end to end: {:>5.2} (commit, upload, delete)",
        e2e_written as f64 / payload
    );
}

async fn preload(port: u16, n: usize, tag: &str) {
    let t = Instant::now();
    let report = Publisher::publish_all(
        port,
        climate_readings(0..n as u64),
        PublisherOptions {
            client_id: format!("bench-pub-{tag}"),
            ..PublisherOptions::default()
        },
        Duration::from_secs(600),
    )
    .await;
    report.assert_all_acked(n);
    eprintln!(
        "  preloaded {n} messages in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// mosquitto's delivery rate from a queued persistent session to a plain subscriber.
async fn baseline(n: usize) -> f64 {
    let dir = TestDir::new("bench-baseline");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let port = mosquitto.port();
    let connect = || {
        let mut o = MqttOptions::new("bench-plain-sub", "127.0.0.1", port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        AsyncClient::new(o, 1000)
    };
    // Create the session with its subscription, then go away.
    let (client, mut el) = connect();
    client
        .subscribe("org/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.expect("poll") {
            break;
        }
    }
    client.disconnect().await.ok();
    while el.poll().await.is_ok() {}
    preload(port, n, "baseline").await;
    let (_client, mut el) = connect();
    let mut got = 0usize;
    let mut start = None;
    while got < n {
        match el.poll().await.expect("poll") {
            Event::Incoming(Packet::ConnAck(_)) => start = Some(Instant::now()),
            Event::Incoming(Packet::Publish(_)) => got += 1,
            _ => {}
        }
    }
    let secs = start.expect("connected").elapsed().as_secs_f64();
    n as f64 / secs
}

/// Payload bytes of the N readings the scenarios publish.
fn payload_bytes(n: usize) -> u64 {
    climate_readings(0..n as u64)
        .iter()
        .map(|r| r.payload.len() as u64)
        .sum()
}

fn outbox_count(data_dir: &Path) -> usize {
    let path = data_dir.join("outbox.db");
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM records", [], |r| r.get::<_, i64>(0))
        .map(|c| c as usize)
        .unwrap_or(0)
}

/// Receive-time span of the outbox's records: first to last, in seconds.
fn outbox_span(data_dir: &Path) -> f64 {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open outbox");
    let (lo, hi): (i64, i64) = conn
        .query_row("SELECT min(time_us), max(time_us) FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("span");
    (hi - lo) as f64 / 1e6
}

/// Starts a gateway, lets it create its session, stops it, preloads the broker.
async fn gateway_with_backlog(
    dir: &TestDir,
    mosquitto: &Mosquitto,
    relay_url: &str,
    n: usize,
    tag: &str,
) -> Gateway {
    let config = GatewayConfig {
        health_interval: Some("60s".into()),
        ..GatewayConfig::new(GATEWAY, TOKEN, relay_url, mosquitto.port())
    };
    let mut gw = Gateway::start_subscribed(dir, config, mosquitto).await;
    gw.stop().await;
    preload(mosquitto.port(), n, tag).await;
    gw
}

/// MQTT → outbox with the relay down. Returns (msgs/s, peak RSS KiB, idle RSS KiB, bytes
/// the gateway wrote to disk).
async fn gateway_ingest(n: usize) -> (f64, u64, u64, u64) {
    let dir = TestDir::new("bench-ingest");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    // Nothing listens here: the uplink keeps retrying, the outbox keeps everything.
    let dead_relay = format!("http://127.0.0.1:{}", pigeon_e2e::free_port());
    let mut gw = gateway_with_backlog(&dir, &mosquitto, &dead_relay, n, "ingest").await;
    gw.restart();
    let pid = gw.proc().pid().expect("pid");
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while outbox_count(gw.data_dir()) < n {
        peak = peak.max(rss_kib(pid, "VmRSS:"));
        assert!(Instant::now() < deadline, "ingest did not finish in 600 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = (n - 1) as f64 / outbox_span(gw.data_dir());
    peak = peak.max(rss_kib(pid, "VmHWM:"));
    // Let the last commits reach the disk (write_bytes counts at writeback).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = write_bytes(pid);
    // Idle: a fresh start with nothing to do (the backlog stays; the relay is down).
    gw.stop().await;
    let dir2 = TestDir::new("bench-idle");
    let mut idle = Gateway::start_subscribed(
        &dir2,
        GatewayConfig {
            // As installed: heartbeats on (the default config's 60 s), HTTP endpoint on.
            health_interval: Some("60s".into()),
            ..GatewayConfig::new("bench-idle", TOKEN, &dead_relay, mosquitto.port())
        },
        &mosquitto,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_rss = rss_kib(idle.proc().pid().expect("pid"), "VmRSS:");
    idle.stop().await;
    (rate, peak, idle_rss, written)
}

/// MQTT → gateway → relay stream files. Returns (readings/s, peak gateway RSS KiB, bytes
/// the gateway wrote to disk, committing and then deleting every reading).
async fn end_to_end(n: usize) -> (f64, u64, u64) {
    let dir = TestDir::new("bench-e2e");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let mut gw = gateway_with_backlog(&dir, &mosquitto, &relay.url(), n, "e2e").await;
    let stream_dir = relay.data_dir().join("stream");
    let t = Instant::now();
    gw.restart();
    let pid = gw.proc().pid().expect("pid");
    let mut peak = 0;
    let deadline = t + Duration::from_secs(600);
    loop {
        peak = peak.max(rss_kib(pid, "VmRSS:"));
        if Stream::count_lines(&stream_dir) >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "end to end did not finish in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    peak = peak.max(rss_kib(pid, "VmHWM:"));
    // Until the outbox is empty (the last settle) and on the disk.
    while outbox_count(gw.data_dir()) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = write_bytes(pid);
    gw.stop().await;
    (n as f64 / secs, peak, written)
}
