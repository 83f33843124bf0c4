//! Benchmarks of the outbox under pressure, with the real binaries (release builds):
//!
//! * drain — a backlog of about 1 GB (camera clips and readings) built while the relay is
//!   away, drained when it comes back: MB/s, events/s, and the gateway's RSS sampled all
//!   along (it should stay flat: nothing of the backlog is held in memory);
//! * bandwidth — `relay.max_upload_rate = "1MiB"` with a backlog far larger than a minute
//!   of it: what the relay received over 60 s;
//! * steady — readings at a steady rate a house or a floor produces (10 and 100 a second),
//!   relay up: what the gateway writes to its disk per second and per payload byte, the
//!   figure that decides how long an SD card lasts.
//!
//! `PIGEON_BENCH_BACKLOG_MB` (default 1000) scales the backlog, `PIGEON_BENCH_RATE_SECS`
//! (default 60) the bandwidth window, `PIGEON_BENCH_STEADY_SECS` (default 30) each steady
//! run.

use std::path::Path;
use std::time::{Duration, Instant};

use pigeon_e2e::{
    CameraFile, Gateway, GatewayConfig, Mosquitto, MosquittoOptions, Publisher, PublisherOptions,
    Relay, TestDir, climate_readings, files_section, rss_kib, watch_table, write_bytes,
};

const GATEWAY: &str = "bench-outbox";
const TOKEN: &str = "bench-outbox-token-0123456789";
const CLIP: usize = 5_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn metric(g: &Gateway, name: &str) -> f64 {
    g.metric(name).await.ok().flatten().unwrap_or(0.0)
}

async fn relay_metric(r: &Relay, name: &str) -> f64 {
    r.metric(name).await.ok().flatten().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("# Pigeon outbox benchmark (release binaries, loopback)\n");
    drain(env_u64("PIGEON_BENCH_BACKLOG_MB", 1000)).await;
    bandwidth(env_u64("PIGEON_BENCH_RATE_SECS", 60)).await;
    let secs = env_u64("PIGEON_BENCH_STEADY_SECS", 30);
    println!("\nsteady readings, relay up (commit, upload, delete), over {secs} s each:");
    for rate in [10, 100] {
        steady(rate, secs).await;
    }
}

/// Copies a staged clip into the drop directory under a new name (a rename, like an FTP
/// server finishing an upload).
fn drop_clip(staged: &Path, drop_dir: &Path, i: u64) {
    let tmp = drop_dir.join(format!(".incoming-{i}"));
    std::fs::copy(staged, &tmp).expect("copy the clip");
    std::fs::rename(
        &tmp,
        drop_dir.join(format!("cam-{}/clip-{i:04}.mp4", i % 4)),
    )
    .expect("rename the clip in");
}

async fn drain(backlog_mb: u64) {
    let dir = TestDir::new("bench-outbox-drain");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let mut relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let drop_dir = dir.join("drop");
    for c in 0..4 {
        std::fs::create_dir_all(drop_dir.join(format!("cam-{c}"))).expect("drop dir");
    }
    let mut config = GatewayConfig::new(GATEWAY, TOKEN, &relay.url(), mosquitto.port());
    config.files = Some(files_section(
        vec![watch_table("cameras", &drop_dir, &[])],
        &[],
    ));
    config.health_interval = Some("60s".into());
    let mut gw = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    gw.wait_watching(1).await;
    relay.stop().await;

    // The backlog: 95% clips, 5% readings (by bytes of payload).
    let readings = (backlog_mb * 1_000_000 / 20 / 180) as usize;
    let clips = (backlog_mb * 1_000_000 * 19 / 20) / CLIP as u64;
    let staged = dir.join("clip.mp4");
    std::fs::write(&staged, CameraFile::mp4("x", CLIP, 1).bytes).expect("stage");
    let t = Instant::now();
    let publisher = Publisher::spawn(
        mosquitto.port(),
        climate_readings(0..readings as u64),
        PublisherOptions {
            client_id: "bench-outbox-pub".into(),
            ..PublisherOptions::default()
        },
    );
    for i in 0..clips {
        drop_clip(&staged, &drop_dir, i);
    }
    publisher
        .finish(Duration::from_secs(600))
        .await
        .assert_all_acked(readings);
    let expected = readings as f64 + clips as f64;
    loop {
        let records = metric(&gw, "pigeon_gateway_outbox_records").await;
        if records >= expected {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "the backlog was not built"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let backlog_bytes = metric(&gw, "pigeon_gateway_outbox_bytes").await;
    println!(
        "backlog built in {:.1} s: {readings} readings and {clips} clips of 5 MB, {:.0} MB waiting",
        t.elapsed().as_secs_f64(),
        backlog_bytes / 1e6
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = gw.proc().pid().expect("pid");
    let before_kib = rss_kib(pid, "VmRSS:");

    relay.restart().await;
    let t = Instant::now();
    let mut rss = Vec::new();
    loop {
        rss.push(rss_kib(pid, "VmRSS:"));
        if metric(&gw, "pigeon_gateway_outbox_records").await == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1800),
            "the backlog did not drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    rss.sort_unstable();
    let mb = |k: u64| k as f64 / 1024.0;
    println!("drain of the backlog once the relay is back:");
    println!(
        "  {:.1} s: {:.1} MB/s, {:.0} events/s ({} readings, {clips} files)",
        secs,
        backlog_bytes / 1e6 / secs,
        expected / secs,
        readings
    );
    println!(
        "  gateway RSS while draining ({} samples): before {:.1} MB; min {:.1}, median {:.1}, p95 {:.1}, max {:.1} MB; VmHWM over the whole run {:.1} MB",
        rss.len(),
        mb(before_kib),
        mb(rss[0]),
        mb(rss[rss.len() / 2]),
        mb(rss[rss.len() * 95 / 100]),
        mb(rss[rss.len() - 1]),
        mb(rss_kib(pid, "VmHWM:"))
    );
    gw.stop().await;
}

async fn bandwidth(window_secs: u64) {
    let dir = TestDir::new("bench-outbox-rate");
    let relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let drop_dir = dir.join("drop");
    for c in 0..4 {
        std::fs::create_dir_all(drop_dir.join(format!("cam-{c}"))).expect("drop dir");
    }
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut config = GatewayConfig::for_files(GATEWAY, TOKEN, &relay.url(), files);
    config
        .relay_options
        .insert("max_upload_rate".into(), "1MiB".into());
    let mut gw = Gateway::start_watching(&dir, config).await;
    let staged = dir.join("clip.mp4");
    std::fs::write(&staged, CameraFile::mp4("x", CLIP, 2).bytes).expect("stage");
    // Twice what the window can carry.
    let clips = (2 * window_secs * 1_048_576).div_ceil(CLIP as u64);
    for i in 0..clips {
        drop_clip(&staged, &drop_dir, i);
    }
    // Past the first seconds (the bucket starts full with one second's worth).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let bytes = || relay_metric(&relay, "pigeon_relay_upload_bytes_received_total");
    let (b0, t0) = (bytes().await, Instant::now());
    tokio::time::sleep(Duration::from_secs(window_secs)).await;
    let (b1, secs) = (bytes().await, t0.elapsed().as_secs_f64());
    let rate = (b1 - b0) / secs;
    println!(
        "\nupload limit relay.max_upload_rate = 1 MiB/s (1,048,576 B/s), a backlog of {clips} clips of 5 MB:"
    );
    println!(
        "  over {secs:.1} s the relay received {:.2} MB: {:.0} B/s, {:+.1}% of the limit",
        (b1 - b0) / 1e6,
        rate,
        (rate / 1_048_576.0 - 1.0) * 100.0
    );
    gw.stop().await;
}

/// Readings at `rate` a second for `secs`, the relay up: the gateway's disk writes.
async fn steady(rate: u32, secs: u64) {
    let dir = TestDir::new("bench-outbox-steady");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let mut config = GatewayConfig::new(GATEWAY, TOKEN, &relay.url(), mosquitto.port());
    config.health_interval = Some("60s".into());
    let mut gw = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    let pid = gw.proc().pid().expect("pid");
    let n = rate as u64 * secs;
    let readings = climate_readings(0..n);
    let payload: usize = readings.iter().map(|r| r.payload.len()).sum();
    // Past the start's own writes (migration, first heartbeat).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = write_bytes(pid);
    let t = Instant::now();
    let publisher = Publisher::spawn(
        mosquitto.port(),
        readings,
        PublisherOptions {
            client_id: format!("bench-steady-{rate}"),
            inflight: 20,
            rate_per_sec: Some(rate),
        },
    );
    publisher
        .finish(Duration::from_secs(secs + 60))
        .await
        .assert_all_acked(n as usize);
    while metric(&gw, "pigeon_gateway_outbox_records").await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(secs + 120), "not drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    // Let writeback count the last commits.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let written = write_bytes(pid).saturating_sub(before) as f64;
    let commits = metric(&gw, "pigeon_gateway_outbox_commits_total").await;
    println!(
        "  {rate:>4}/s: {:.0} KB/s written ({:.1} GB a day), {:.1} per payload byte ({:.0} B of payload a reading), {:.0} commits",
        written / elapsed / 1e3,
        written / elapsed * 86_400.0 / 1e9,
        written / payload as f64,
        payload as f64 / n as f64,
        commits
    );
    gw.stop().await;
}
